"""The shared training machinery every stage uses.

    trainer.py     Trainer(model, loss_fn, train_source, stage_cfg, optim_cfg, ...).fit(): DDP, AdamW, schedule,
                   accumulation, clipping, AMP, non-finite skipping, validation, logging, checkpoints, profiling
    batches.py     RowBatchSource (checkpointable, rank-disjoint, world-size-invariant), EvalBatches, TokenWindows,
                   collate_rows
    checkpoint.py  atomic save / load, latest + final pointers, keep-last-N, stage hand-over (require_stage_output)
    metrics.py     JSON-lines writer, MFU and the per-device peak table, loss-curve PNG
    profiling.py   trace_range (NVTX + record_function), StepProfiler (--profile)
    distributed.py init_distributed / shutdown_distributed for torchrun (nccl on GPU, gloo on CPU)
    runner.py      the scripts/run_pipeline.py command line
"""
