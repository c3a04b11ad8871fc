"""bf16 lens parameters keep fp32 master weights and fp32 gradient accumulation (issue 22): real DeepSpeed on one
and two gloo ranks over the tiny synthetic LensSet of test_training_loop. The saved banks are the optimizer's fp32
masters (two ranks: gathered, equal to what the checkpoint holds), 2 micro-batches' gradients are summed in fp32, so
are the gradients of a micro-batch's loss chunks (rounded to bf16 once, at the leaf; fp32 lenses unchanged), a
resumed run continues exactly, the memory plan counts the fp32 gradients, and the ZeRO stages where DeepSpeed 0.19
cannot do this (0 and 1) are a one-line config error."""

from __future__ import annotations

import copy
import functools
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from test_training_loop import SHARDS, _init, lens_set, loader, spec

from loralens.config import ConfigError, parse_config
from loralens.lens.lenses.lens_set import FORMS, LensConfig
from loralens.lens.lenses.objective import LensBatch, LensSet
from loralens.lens.lenses.peft_io import load_bank, save_bank
from loralens.lens.memory.training_plan import PlanError, plan_memory
from loralens.lens.runtime.adapters import ModelDims
from loralens.lens.training.deepspeed_loop import BF16_NEEDS_ZERO, deepspeed_config, free_port

STAGES = (2, 3)


def flat_master(engine) -> torch.Tensor:
    """Return the optimizer's own flat fp32 master partition (one rank: the whole group, maybe padded)."""
    opt = engine.optimizer
    for attr in ("single_partition_of_fp32_groups", "fp32_partitioned_groups_flat"):
        if hasattr(opt, attr):
            return getattr(opt, attr)[0].detach().float().cpu().clone()
    raise AssertionError(f"no fp32 master in {type(opt).__name__}")


def train_run(root: Path, name: str, overrides: dict) -> dict:
    """Train a bf16 LensSet through the loop; return its masters, the saved bank's weights and the dtypes."""
    from loralens.lens.training.checkpoints import final_state
    from loralens.lens.training.deepspeed_loop import train

    kw = dict(overrides)
    ckpt = root / kw.pop("ckpt", name)  # a run given another run's folder resumes from its newest checkpoint
    s = spec(bf16=True, **kw)
    result, engine = train(lens_set(), loader, s, ckpt, device=torch.device("cpu"))
    state = final_state(engine, ckpt, result.final_tag, s.zero_stage, bf16=True, rank=0)
    final = lens_set()  # fp32, as the train worker builds it
    final.load_state_dict(state, strict=False)
    saved = load_bank(save_bank(final.banks[0], root / f"{name}-bank"), final.unembed)
    out = {"steps": result.steps, "resumed_from": result.resumed_from, "master": flat_master(engine),
           "saved": torch.cat([p.detach().flatten() for p in saved.parameters()]),
           "saved_dtypes": {p.dtype for p in saved.parameters()},
           "module_dtypes": {p.dtype for p in engine.module.parameters()}}
    engine.destroy()
    return out


CHUNK = 2  # tokens per loss chunk in the chunk tests: an 8-token micro-batch is 4 chunks, a 16-token one 8


def micro_batches(n: int, tokens: int = 8) -> list[LensBatch]:
    """The loop's first `n` micro-batches of `tokens` tokens (epoch 0, seed 0)."""
    from loralens.lens.training.batches import train_batches

    s = spec()
    return list(train_batches(loader, list(range(SHARDS)), s.train_rows, epoch=0, seed=0, micro_batch=tokens,
                              n_steps=n, skip_steps=0, every=s.every, store_dtype=s.store_dtype))


def flat_grad(model: torch.nn.Module) -> torch.Tensor:
    """Return every parameter's gradient, flattened and concatenated (in the parameters' dtype)."""
    return torch.cat([p.grad.flatten() for p in model.parameters()])


def chunk_grads(model: LensSet, batch: LensBatch, divide: int = 1) -> list[torch.Tensor]:
    """Return each loss chunk's own gradient of `model(batch) / divide` (flattened), last chunk first: the order in
    which autograd sums them. The real forward, with every other chunk's logits detached."""
    n_chunks = -(-len(batch.mask) // model.chunk)
    lens_fn, grads = model.lens_fn, []
    for k in reversed(range(n_chunks)):
        def only_chunk(i, x, k=k):
            fn = lens_fn(i, x)
            return lambda rows: fn(rows) if rows.start == k * model.chunk else fn(rows).detach()

        model.lens_fn = only_chunk  # this instance only
        model.zero_grad(set_to_none=True)
        (model(batch) / divide).backward()
        grads.append(flat_grad(model))
    del model.lens_fn
    model.zero_grad(set_to_none=True)
    return grads


def fp32_sum(grads: list[torch.Tensor]) -> torch.Tensor:
    """Return the fp32 sum of `grads` in their order (autograd's)."""
    return functools.reduce(torch.add, grads)


def accumulated_grad(zero: int) -> dict:
    """Drive the loop's DeepSpeed config through 2 micro-batches of 4 loss chunks each; return the gradient the
    optimizer would step (read at the accumulation boundary), each micro-batch's own bf16 gradient from a plain bf16
    copy, and each micro-batch's chunk gradients in fp32 (from an fp32 copy holding the same bf16 values)."""
    import deepspeed
    from deepspeed.utils import safe_get_full_grad

    s = spec(bf16=True, zero_stage=zero, grad_accum=2)
    batches = micro_batches(2)
    plain, twin = lens_set(), lens_set()
    plain.chunk = twin.chunk = CHUNK
    plain.fused = twin.fused = False  # checkpointed chunks, whose gradients chunk_grads can take apart
    for p, q in zip(plain.parameters(), twin.parameters(), strict=True):
        p.data = p.data.bfloat16()  # what the engine trains: bf16 parameters over fp32 buffers
        q.data = p.data.float()
    micro = []
    for batch in batches:
        plain.zero_grad(set_to_none=True)
        (plain(batch) / 2).backward()  # DeepSpeed divides each micro-batch's loss by grad_accum
        micro.append(flat_grad(plain))
    chunks = [chunk_grads(twin, batch, divide=2) for batch in batches]
    model = lens_set()
    model.chunk, model.fused = CHUNK, False
    trainable = [p for p in model.parameters() if p.requires_grad]
    engine, *_ = deepspeed.initialize(model=model, optimizer=torch.optim.AdamW(trainable, lr=s.lr),
                                      model_parameters=trainable, config=deepspeed_config(s))
    for i, batch in enumerate(batches):
        engine.backward(engine(batch))
        if i == 1:
            grad = torch.cat([safe_get_full_grad(p).flatten() for p in engine.module.parameters()])
        engine.step()
    engine.destroy()
    return {"micro": micro, "grad": grad, "chunks": chunks}


def bf16_main(rank: int, root: str, port: int, runs: list[tuple[str, dict]]) -> None:
    """In one gloo rank: the named bf16 trainings one after another, then the accumulation probe per stage."""
    _init(rank, 1, port)
    out = {name: train_run(Path(root), name, kw) for name, kw in runs}
    out |= {f"grad{z}": accumulated_grad(z) for z in STAGES}
    torch.save(out, Path(root) / "bf16.pt")


@pytest.fixture(scope="module")
def bf16_runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("bf16")
    runs = []
    for z in STAGES:
        runs += [(f"accum{z}", {"zero_stage": z, "max_steps": 3, "grad_accum": 2}),
                 # resume: 2 steps, then a new engine from that checkpoint to 4, against 4 straight
                 (f"half{z}", {"zero_stage": z, "max_steps": 2}),
                 (f"half{z}-resumed", {"zero_stage": z, "max_steps": 4, "ckpt": f"half{z}"}),
                 (f"straight{z}", {"zero_stage": z, "max_steps": 4})]
    mp.start_processes(bf16_main, args=(str(root), free_port(), runs), nprocs=1, start_method="spawn")
    return torch.load(root / "bf16.pt", weights_only=False)


@pytest.mark.parametrize("zero", STAGES)
def test_saved_banks_are_the_fp32_masters_not_their_bf16_rounding(bf16_runs, zero):
    run = bf16_runs[f"accum{zero}"]
    assert run["steps"] == 3 and run["module_dtypes"] == {torch.bfloat16}  # the engine trains bf16 weights
    assert run["saved_dtypes"] == {torch.float32}
    saved, master = run["saved"], run["master"]
    assert torch.equal(saved, master[: saved.numel()])  # bit for bit the optimizer's fp32 masters
    assert (saved != saved.bfloat16().float()).any()  # not bf16-rounded


@pytest.mark.parametrize("zero", STAGES)
def test_two_micro_batches_gradients_are_summed_in_fp32(bf16_runs, zero):
    probe = bf16_runs[f"grad{zero}"]
    first, second = probe["micro"]
    assert first.dtype == second.dtype == torch.bfloat16 and probe["grad"].dtype == torch.float32
    exact = first.float() + second.float()
    assert torch.equal(probe["grad"], exact)  # the fp32 sum: what one double-size micro-batch's fp32 gradient adds
    assert (exact != exact.bfloat16().float()).any()  # a bf16 accumulation would have rounded it


@pytest.mark.parametrize("zero", STAGES)
def test_a_micro_batchs_chunk_gradients_are_summed_in_fp32_and_rounded_once_under_zero(bf16_runs, zero):
    probe = bf16_runs[f"grad{zero}"]
    assert [len(chunks) for chunks in probe["chunks"]] == [4, 4]
    want = [fp32_sum(chunks).bfloat16() for chunks in probe["chunks"]]  # each micro-batch: one rounding
    assert all(torch.equal(got, w) for got, w in zip(probe["micro"], want, strict=True))
    assert torch.equal(probe["grad"], want[0].float() + want[1].float())  # what the engine's fp32 partition holds


@pytest.mark.parametrize("zero", STAGES)
def test_a_resumed_bf16_run_continues_exactly_from_the_fp32_masters(bf16_runs, zero):
    resumed, straight = bf16_runs[f"half{zero}-resumed"], bf16_runs[f"straight{zero}"]
    assert resumed["resumed_from"] == 2 and resumed["steps"] == straight["steps"] == 4
    assert torch.equal(resumed["master"], straight["master"])


def seeded_set(form: str, objective: str) -> LensSet:
    """The tiny LensSet of test_training_loop as `form` / `objective` with every parameter randomised (fp32), its loss
    in checkpointed chunks of CHUNK tokens (the fused loss of lora + joint: tests/test_fused_kl.py)."""
    src = lens_set()
    out = LensSet(src.unembed, src.w_o, src.layers, LensConfig(form=form, rank=2, alpha=4.0, objective=objective),
                  lm_head=src.lm_head, chunk=CHUNK, fused=False)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in out.parameters():
            p.add_(0.3 * torch.randn(p.shape, generator=g))
    return out


OBJECTIVES = ("joint", "per_head")


@pytest.mark.parametrize("objective", OBJECTIVES)
@pytest.mark.parametrize("form", FORMS)
def test_a_bf16_leaf_gradient_is_its_chunks_fp32_gradients_summed_in_fp32_and_rounded_once(form, objective):
    twin = seeded_set(form, objective)
    bf16 = copy.deepcopy(twin)
    for p, q in zip(bf16.parameters(), twin.parameters(), strict=True):
        p.data = p.data.bfloat16()
        q.data = p.data.float()  # fp32 parameters holding the bf16 values
    batch = micro_batches(1, tokens=16)[0]
    bf16(batch).backward()
    chunks = chunk_grads(twin, batch)
    assert len(chunks) == 8
    want = fp32_sum(chunks).bfloat16()
    assert torch.equal(flat_grad(bf16), want)
    chunk_by_chunk = functools.reduce(torch.add, [g.bfloat16() for g in chunks])  # a bf16 sum rounds every chunk
    assert (chunk_by_chunk != want).any()


@pytest.mark.parametrize("objective", OBJECTIVES)
@pytest.mark.parametrize("form", FORMS)
def test_fp32_lenses_compute_with_their_own_parameters_and_sum_chunk_gradients_in_fp32(form, objective):
    model = seeded_set(form, objective)
    bank = model.banks[0]
    assert all(w is p for w, p in zip(bank.weights().values(), bank.parameters(), strict=True))  # no copy
    batch = micro_batches(1, tokens=16)[0]
    model(batch).backward()
    got = flat_grad(model)
    assert got.dtype == torch.float32 and torch.equal(got, fp32_sum(chunk_grads(model, batch)))


def test_bf16_asks_deepspeed_for_fp32_accumulation_and_refuses_zero_0_and_1():
    for z in STAGES:
        assert deepspeed_config(spec(bf16=True, zero_stage=z))["data_types"] == {"grad_accum_dtype": "fp32"}
        assert parse_config({"train": {"param_dtype": "bfloat16", "zero_stage": z}}).train.zero_stage == z
    assert "data_types" not in deepspeed_config(spec(zero_stage=0))
    for z in (0, 1):
        with pytest.raises(ValueError, match="train.zero_stage"):
            deepspeed_config(spec(bf16=True, zero_stage=z))
        with pytest.raises(ConfigError, match=r"train\.param_dtype 'bfloat16' needs train\.zero_stage 2 or 3") as e:
            parse_config({"train": {"param_dtype": "bfloat16", "zero_stage": z}})
        assert "\n" not in str(e.value) and "\n" not in BF16_NEEDS_ZERO


def test_the_memory_plan_counts_fp32_masters_and_fp32_gradients_for_bf16_lenses():
    dims = ModelDims(n_layers=4, n_heads=2, d_head=8, d_model=16, vocab=100)
    for z, n in ((2, 4), (3, 4)):
        fp32 = plan_memory(dims, LensConfig(), micro_batch_tokens=8, world_size=n, zero_stage=z)
        bf16 = plan_memory(dims, LensConfig(dtype="bfloat16"), micro_batch_tokens=8, world_size=n, zero_stage=z)
        P = bf16.params_total
        assert bf16.optimizer_bytes == fp32.optimizer_bytes == 12 * P // n  # fp32 master + exp_avg + exp_avg_sq
        assert bf16.grad_bytes == 2 * P // n + 4 * P // n  # bf16 gradients + the fp32 accumulation partition
        # fp32 copies of one layer's weights per chunk, the chunks' gradients summed in fp32: fp32's activations
        assert (bf16.act_upcast_bytes, fp32.act_upcast_bytes) == (4 * bf16.params_per_layer, 0)
        assert bf16.act_grad_accum_bytes == fp32.act_grad_accum_bytes
        assert bf16.activation_bytes == fp32.activation_bytes + bf16.act_upcast_bytes
    with pytest.raises(PlanError, match="ZeRO stage 2 or 3"):
        plan_memory(dims, LensConfig(dtype="bfloat16"), micro_batch_tokens=8, zero_stage=1)


def two_rank_main(rank: int, root: str, port: int) -> None:
    """Two gloo ranks train bf16 under ZeRO-2 and ZeRO-3; rank 0 saves the gathered fp32 masters and the fp32
    state DeepSpeed's zero_to_fp32 reads back from the final checkpoint."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    from loralens.lens.training.checkpoints import final_state
    from loralens.lens.training.deepspeed_loop import train

    _init(rank, 2, port)
    out = {}
    for z in STAGES:
        s = spec(bf16=True, zero_stage=z, max_steps=2, grad_accum=2)
        ckpt = Path(root) / f"two{z}"
        result, engine = train(lens_set(), loader, s, ckpt, device=torch.device("cpu"))
        state = final_state(engine, ckpt, result.final_tag, z, bf16=True, rank=rank)
        engine.destroy()
        if rank == 0:
            out[z] = {"masters": state, "checkpoint": get_fp32_state_dict_from_zero_checkpoint(str(ckpt),
                                                                                              tag=result.final_tag)}
        else:
            assert state is None
    if rank == 0:
        torch.save(out, Path(root) / "two.pt")


def test_two_ranks_gather_the_full_fp32_masters_that_the_checkpoint_holds(tmp_path):
    mp.start_processes(two_rank_main, args=(str(tmp_path), free_port()), nprocs=2, start_method="spawn")
    out = torch.load(tmp_path / "two.pt", weights_only=False)
    shapes = {k: v.shape for k, v in lens_set().state_dict().items()}
    for z in STAGES:
        masters, checkpoint = out[z]["masters"], out[z]["checkpoint"]
        assert {k: v.shape for k, v in masters.items()} == shapes
        for k, v in masters.items():
            assert v.dtype == torch.float32 and torch.equal(v, checkpoint[k]), (z, k)
        assert any((v != v.bfloat16().float()).any() for v in masters.values())
