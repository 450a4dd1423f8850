"""model.weight_cache (mllm/models/weight_cache.py): matrix weights cast to the autocast dtype once per optimizer
step. The claim is exact: losses and gradients are bitwise those of the plain autocast path, in eager and
compiled code, as long as the copies are refreshed — so most tests train two models in lockstep (option off /
on, same seed and batches) and compare with ``torch.equal``, and the staleness tests change weights in each way
the module docstring lists (optimizer steps incl. fused AdamW, in-place writes, load_state_dict, deepcopy, dtype)
and check that the next forward sees the change. Shapes are tiny (CPU, bf16 autocast); the structure covers
every use site: separate and fused q/k/v, MLP, tied and untied heads with a padded vocabulary."""
import copy

import pytest
import torch

from mllm.config.pipeline_config import ConfigError, ModelConfig, OptimConfig
from mllm.models.transformer import Transformer
from mllm.models.weight_cache import WeightCache

BF16 = torch.bfloat16


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    torch._dynamo.reset()  # every test compiles fresh models: dynamo's per-code-object recompile limit is 8
    yield
    torch.set_num_threads(n)


def model(weight_cache, seed=0, **kw):
    torch.manual_seed(seed)
    base = dict(vocab_size=100, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=96, max_seq_len=32,
                vocab_pad_multiple=64)
    return Transformer(ModelConfig(**{**base, **kw}, weight_cache=weight_cache))


def batch(i, B=2, T=16):
    x = torch.randint(0, 100, (B, T), generator=torch.Generator().manual_seed(1000 + i))
    return x, x.roll(-1, 1)


def loss_of(fwd, x, y, dtype=BF16):
    with torch.autocast("cpu", dtype=dtype):
        return fwd(x, labels=y)


def lockstep(models, fwds, opts, steps=3, accum=2):
    """Train every model on the same micro-batches; assert equal losses and gradients at every point."""
    for s in range(steps):
        for j in range(accum):
            x, y = batch(s * accum + j)
            losses = []
            for f in fwds:
                loss = loss_of(f, x, y) / accum
                loss.backward()
                losses.append(loss.detach())
            assert all(torch.equal(losses[0], l) for l in losses[1:]), (s, j, losses)
        for ps in zip(*(m.parameters() for m in models)):
            assert all(torch.equal(ps[0].grad, p.grad) for p in ps[1:])
        for o in opts:
            o.step()
            o.zero_grad()
    for ps in zip(*(m.parameters() for m in models)):
        assert all(torch.equal(ps[0], p) for p in ps[1:])


@pytest.mark.parametrize("fused_adamw", [False, True])
@pytest.mark.parametrize("variant", [{}, {"fused_qkv": True}, {"tie_embeddings": False}])
def test_eager_training_is_bitwise_the_autocast_path(variant, fused_adamw):
    """fused AdamW updates parameters without bumping their version counters: the step hook must recast anyway."""
    a, b = model(False, **variant), model(True, **variant)
    opts = [torch.optim.AdamW(m.parameters(), lr=1e-2, fused=fused_adamw) for m in (a, b)]
    lockstep([a, b], [a, b], opts)
    assert a.weight_caches() == [] and all(c.lp is not None and c.lp.dtype == BF16 for c in b.weight_caches())
    n_linear = 2 * (5 if variant.get("fused_qkv") else 7) + 1  # per layer q|k|v or qkv, o, gate, up, down; head
    assert len(b.weight_caches()) == n_linear


def test_compiled_training_is_bitwise_the_autocast_path():
    """Under torch.compile no staleness check runs in the graph: the step hook alone keeps the copies
    fresh (no sync_weight_cache call here), and the fused q/k/v concatenation is cached too."""
    a, b = model(False, fused_qkv=True), model(True, fused_qkv=True)
    fwds = [torch.compile(m, fullgraph=True, backend="aot_eager") for m in (a, b)]  # inductor: 70 s on CPU
    opts = [torch.optim.AdamW(m.parameters(), lr=1e-2, fused=True) for m in (a, b)]
    lockstep([a, b], fwds, opts, steps=3, accum=1)


TRITON_GOAL = dict(kernel_backend="triton", d_model=128, n_heads=2, n_kv_heads=1, residual_dtype="autocast")


@pytest.mark.parametrize("fused_qkv,kw", [(False, {}), (True, {}), (True, TRITON_GOAL)],
                         ids=["eager", "eager-fused_qkv", "triton-train_goal"])
def test_compiled_forward_holds_no_weight_cast(fused_qkv, kw):
    """The point of the option: the forward graph casts no 2-D weight (15 casts per forward without it here: 7
    projections x 2 layers + the head; fused q/k/v: 4 x 2 + 1, plus the concatenation of the fp32 weights). The
    triton case is gpu_check's train_goal_wcache model (Triton ops and the fused LM loss in one fullgraph trace)."""
    from functorch.compile import make_boxed_func
    from torch._dynamo.backends.common import aot_autograd
    from torch._functorch.partitioners import min_cut_rematerialization_partition

    def weight_casts(weight_cache):
        m = model(weight_cache, fused_qkv=fused_qkv, **kw)
        graphs = {}

        def record(gm, _inputs):
            graphs.setdefault("fw", gm)
            return make_boxed_func(gm.forward)

        be = aot_autograd(fw_compiler=record, bw_compiler=lambda gm, _i: make_boxed_func(gm.forward),
                          partition_fn=min_cut_rematerialization_partition)
        x, y = batch(0)
        loss_of(torch.compile(m, fullgraph=True, backend=be), x, y).backward()
        nodes = [n for n in graphs["fw"].graph.nodes if n.op == "call_function"]
        casts = [n for n in nodes if "_to_copy" in str(n.target) and n.args[0].op == "placeholder"
                 and n.args[0].meta["val"].dim() == 2]
        cats = [n for n in nodes if "cat" in str(n.target) and all(a.op == "placeholder" for a in n.args[0])]
        return len(casts), len(cats)

    assert weight_casts(False) == ((9, 2) if fused_qkv else (15, 0))
    assert weight_casts(True) == (0, 0)


def test_in_place_writes_load_state_dict_and_force():
    a, b = model(False), model(True)
    x, y = batch(0)
    assert torch.equal(loss_of(a, x, y), loss_of(b, x, y))
    with torch.no_grad():  # version counters see these: the next eager forward recasts
        for m in (a, b):
            m.layers[0].mlp.up_proj.weight.mul_(1.5)
            m.tok_emb.weight.add_(0.01)
    assert torch.equal(loss_of(a, x, y), loss_of(b, x, y))

    # a compiled forward cannot check: load_state_dict's post-hook recasts
    cb = torch.compile(b, fullgraph=True, backend="aot_eager")
    assert torch.equal(loss_of(a, x, y), loss_of(cb, x, y))
    other = model(False, seed=7).state_dict()
    a.load_state_dict(other)
    b.load_state_dict(other)
    assert torch.equal(loss_of(a, x, y), loss_of(cb, x, y))

    # writes through .data bypass version counters: stale until sync_weight_cache(force=True)
    for m in (a, b):
        m.layers[1].attn.q_proj.weight.data.mul_(-1.0)
    assert not torch.equal(loss_of(a, x, y), loss_of(cb, x, y))
    with torch.autocast("cpu", dtype=BF16):
        assert b.sync_weight_cache() == 0  # versions unchanged: looks fresh
        assert b.sync_weight_cache(force=True) == len(b.weight_caches())
    assert torch.equal(loss_of(a, x, y), loss_of(cb, x, y))


def test_copies_follow_dtype_deepcopy_and_no_autocast():
    a, b = model(False), model(True)
    x, y = batch(1)
    # made at construction in bf16, so that a forward compiled before any sync finds them
    assert {c.lp.dtype for c in b.weight_caches()} == {BF16}
    with torch.no_grad():
        assert torch.equal(a(x, labels=y), b(x, labels=y))  # no autocast: the copies are not used
    assert torch.equal(loss_of(a, x, y, torch.float16), loss_of(b, x, y, torch.float16))
    assert {c.lp.dtype for c in b.weight_caches()} == {torch.float16}
    assert torch.equal(loss_of(a, x, y), loss_of(b, x, y))  # a bf16 autocast recasts to bf16
    assert {c.lp.dtype for c in b.weight_caches()} == {BF16}

    # the DPO stage deep-copies the policy as its reference model: the copy's caches belong to the copy
    ref = copy.deepcopy(b).requires_grad_(False)
    ref_params = {id(p) for p in ref.parameters()}
    assert len(ref.weight_caches()) == len(b.weight_caches())
    assert all(all(id(p) in ref_params for p in c.params) for c in ref.weight_caches())
    assert all(torch.equal(c.lp, d.lp) and c.lp is not d.lp for c, d in zip(ref.weight_caches(), b.weight_caches()))
    opt = torch.optim.SGD(b.parameters(), lr=0.5)
    loss_of(b, x, y).backward()
    opt.step()  # changes b only
    cref = torch.compile(ref, fullgraph=True, backend="aot_eager")  # no sync: the copies made at deepcopy
    assert torch.equal(loss_of(a, x, y), loss_of(cref, x, y))


def test_trainer_with_weight_cache_trains_like_without(monkeypatch):
    """The Trainer under a (patched) CPU bf16 autocast: sync before each step and the step hook keep the copies
    fresh; evaluation between steps (its own sync) changes nothing."""
    from tests.test_trainer import TokenWindows, make_trainer, stage, stream
    from mllm.training.trainer import Trainer

    monkeypatch.setattr(Trainer, "autocast", lambda self: torch.autocast("cpu", dtype=BF16))
    sc = stage(steps=3, batch_size=8, micro_batch_size=4, seq_len=16)
    runs = []
    for wc in (False, True):
        m = model(wc, vocab_size=64, vocab_pad_multiple=1)
        toks = torch.tensor(stream(40))
        val = [{"input_ids": toks[:16].view(1, 16), "labels": toks[1:17].view(1, 16)}]
        tr = make_trainer(sc, model=m, val_data=val, optim=OptimConfig())
        out = [tr.train_step()["loss"], tr.evaluate()["val_loss"], tr.train_step()["loss"], tr.train_step()["loss"]]
        tr.close()
        runs.append((out, [p.detach().clone() for p in m.parameters()]))
    assert runs[0][0] == runs[1][0]
    assert all(torch.equal(p, q) for p, q in zip(runs[0][1], runs[1][1]))


def test_config_and_construction_errors():
    with pytest.raises(ConfigError, match="model.weight_cache"):
        model("yes")
    with pytest.raises(ValueError, match="2-D weights"):
        WeightCache([torch.nn.Parameter(torch.zeros(3))])
    with pytest.raises(ValueError, match="one column count"):
        WeightCache([torch.nn.Parameter(torch.zeros(2, 3)), torch.nn.Parameter(torch.zeros(2, 4))])


def test_copies_follow_a_dtype_conversion_of_the_model():
    """Transformer._apply: after .half() a compiled forward (no staleness check) reads copies cast from the new
    parameters, not the old fp32 values (bf16 of an fp16 rounding differs from bf16 of the fp32 value)."""
    a, b = model(False), model(True)
    cb = torch.compile(b, fullgraph=True, backend="aot_eager")
    x, y = batch(2)
    a.half()
    b.half()
    assert torch.equal(loss_of(a, x, y), loss_of(cb, x, y))


@pytest.mark.gpu
def test_cuda_graphs_with_weight_cache_on_the_gpu():
    """On the GPU, the configuration bench_train's train_goal_wcache times: triton kernels, torch.compile with
    CUDA graphs (reduce-overhead), fused AdamW, accumulation 2. The copies live on the GPU as static addresses,
    no graph is skipped, and the losses follow the plain autocast model's (bitwise in the maths; the loose 1e-6
    allows a last-bit difference in the loss reduction, far below what one stale step changes)."""
    from torch._dynamo.utils import counters

    counters.clear()
    dev = torch.device("cuda")
    kw = dict(kernel_backend="triton", d_model=128, n_heads=2, n_kv_heads=1, ffn_dim=256, fused_qkv=True)
    runs = []
    for wc in (False, True):
        m = model(wc, **kw).to(dev)
        if wc:
            assert all(c.lp.device.type == "cuda" and c.lp.dtype == BF16 for c in m.weight_caches())
        f = torch.compile(m, mode="reduce-overhead")
        for p in m.parameters():  # as bench_train and the Trainer do under CUDA graphs
            p.grad = torch.zeros_like(p)
        opt = torch.optim.AdamW(m.parameters(), lr=1e-2, fused=True)
        losses = []
        for s in range(4):
            for j in range(2):
                x, y = (t.to(dev) for t in batch(s * 2 + j))
                torch.compiler.cudagraph_mark_step_begin()
                with torch.autocast("cuda", dtype=BF16):
                    loss = f(x, labels=y) / 2
                loss.backward()
                losses.append(float(loss))
            opt.step()
            opt.zero_grad(set_to_none=False)
        runs.append(losses)
    assert counters["inductor"]["cudagraph_skips"] == 0, dict(counters["inductor"])
    assert runs[1] == pytest.approx(runs[0], rel=1e-6, abs=0)
