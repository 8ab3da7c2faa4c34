"""The planner: shares, micro-steps, precision and ZeRO choices, the plan file, topology checks."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from hetlm.cluster.hardware import lookup_gpu
from hetlm.cluster.memory import ModelShape
from hetlm.cluster.planner import (
    allocate_shares,
    choose_precision,
    comm_bytes,
    estimate_gpu_days,
    flops_per_sample,
    format_micro_batches,
    load_plan,
    make_plan,
)
from hetlm.cluster.spec import parse_cluster
from hetlm.errors import HetlmError
from hetlm.models.presets import bert_config


def cluster(*nodes: tuple[str, int], **network: float):
    return parse_cluster(
        {"nodes": [{"gpus": {"model": m, "count": c}} for m, c in nodes], "network": network}
    )


@pytest.fixture(scope="module")
def bert_base() -> ModelShape:
    return ModelShape.from_config(bert_config("base", 32000), name="bert-base")


@pytest.fixture(scope="module")
def bert_small() -> ModelShape:
    return ModelShape.from_config(bert_config("small", 32000), name="bert-small")


# --------------------------------------------------------------------------- shares


def test_speed_decides_shares_when_caps_allow() -> None:
    steps, shares = allocate_shares(90, caps=[100, 100], speeds=[1.0, 2.0])
    assert (steps, shares) == (1, [30, 60])


def test_memory_caps_a_fast_rank_and_the_rest_goes_to_others() -> None:
    steps, shares = allocate_shares(100, caps=[20, 80], speeds=[4.0, 1.0])
    assert steps == 1 and shares == [20, 80]
    steps, shares = allocate_shares(120, caps=[20, 80, 80], speeds=[10.0, 1.0, 3.0])
    assert steps == 1 and shares[0] == 20 and shares[1:] == [25, 75]


def test_micro_steps_is_the_fewest_that_fit() -> None:
    steps, shares = allocate_shares(256, caps=[40, 40, 24], speeds=[1.0, 1.0, 1.0])
    assert steps == math.ceil(256 / 104) == 3
    assert sum(shares) == 256 and all(
        s <= steps * c for s, c in zip(shares, [40, 40, 24], strict=True)
    )


def test_infeasible_global_batches_are_refused_with_alternatives() -> None:
    with pytest.raises(HetlmError, match="smaller than the 3 ranks"):
        allocate_shares(2, caps=[5, 5, 5], speeds=[1, 1, 1])
    with pytest.raises(HetlmError, match="nearest global batches that work, 2 or 4"):
        allocate_shares(3, caps=[1, 1], speeds=[1, 1])


@settings(max_examples=300, deadline=None)
@given(
    st.lists(st.tuples(st.integers(1, 64), st.floats(0.1, 100.0)), min_size=1, max_size=12),
    st.integers(1, 4096),
)
def test_share_allocation_properties(ranks: list[tuple[int, float]], global_batch: int) -> None:
    caps = [c for c, _ in ranks]
    speeds = [v for _, v in ranks]
    try:
        steps, shares = allocate_shares(global_batch, caps, speeds)
    except HetlmError:
        steps = math.ceil(global_batch / sum(caps))
        assert len(caps) * steps > global_batch  # refused only when truly infeasible
        return
    assert steps == math.ceil(global_batch / sum(caps))
    assert sum(shares) == global_batch
    for share, cap in zip(shares, caps, strict=True):
        assert steps <= share <= steps * cap
    # Balance: moving a sample from a rank above the floor (i) to one below its cap (j) never
    # helps, i.e. i is not clearly slower than j would be with one more; 1 sample of rounding.
    for i in range(len(caps)):
        for j in range(len(caps)):
            if shares[i] > steps and shares[j] < steps * caps[j]:
                assert (shares[i] - 1) / speeds[i] <= (shares[j] + 1) / speeds[j] + 1e-9


def test_faster_gpu_gets_proportionally_more(bert_small: ModelShape) -> None:
    mixed = cluster(("V100-32GB", 2), ("RTX-A6000", 2))
    plan = make_plan(mixed, bert_small, 512, 128)
    v100, a6000 = plan.ranks[0], plan.ranks[2]
    ratio = lookup_gpu("RTX-A6000").peak("fp16") / lookup_gpu("V100-32GB").peak("fp16")
    assert a6000.share / v100.share == pytest.approx(ratio, rel=0.02)
    assert {len(r.micro_batches) for r in plan.ranks} == {plan.micro_steps}
    assert sum(r.share for r in plan.ranks) == 512


def test_measured_speeds_replace_peaks(bert_small: ModelShape) -> None:
    spec = {"nodes": [{"gpus": {"model": "T4", "count": 2}, "samples_per_s": [100.0, 300.0]}]}
    plan = make_plan(parse_cluster(spec), bert_small, 400, 128)
    assert [r.share for r in plan.ranks] == [100, 300]
    assert {r.speed_source for r in plan.ranks} == {"measured"}
    assert plan.ranks[0].compute_s == pytest.approx(1.0)


def test_small_memory_forces_micro_steps(bert_base: ModelShape) -> None:
    tight = parse_cluster({"nodes": [{"gpus": {"model": "T4", "count": 2, "memory_gib": 4}}]})
    plan = make_plan(tight, bert_base, 256, 512)
    assert plan.micro_steps > 1
    for row in plan.ranks:
        assert max(row.micro_batches) <= row.cap
        assert row.est_memory_gib <= 0.9 * 4
    assert plan.batch_split.micro_steps == plan.micro_steps


# --------------------------------------------------------------------------- precision


@pytest.mark.parametrize(
    ("gpus", "expected"),
    [
        ((("V100-32GB", 2), ("RTX-A6000", 2)), "fp16"),
        ((("RTX-A6000", 2), ("A100-80GB", 4)), "bf16"),
        ((("T4", 1),), "fp16"),
        ((("H100", 8),), "bf16"),
        ((("cpu", 2),), "bf16"),
        ((("cpu", 1), ("V100-16GB", 1)), "fp32"),  # no 16-bit format both can use
    ],
)
def test_auto_precision(gpus, expected: str) -> None:
    assert choose_precision(cluster(*gpus)) == expected


def test_explicit_precision_is_checked_against_every_gpu(bert_small: ModelShape) -> None:
    mixed = cluster(("V100-32GB", 2), ("RTX-A6000", 2))
    with pytest.raises(HetlmError) as info:
        make_plan(mixed, bert_small, 64, 128, precision="bf16")
    message = str(info.value)
    assert "V100-32GB" in message and "node0" in message and "--precision fp16" in message
    assert "RTX-A6000" not in message
    assert make_plan(mixed, bert_small, 64, 128, precision="fp32").precision == "fp32"
    with pytest.raises(HetlmError, match="not 'fp8'"):
        make_plan(mixed, bert_small, 64, 128, precision="fp8")


# --------------------------------------------------------------------------- ZeRO and engines


def test_small_models_get_ddp(bert_base: ModelShape) -> None:
    plan = make_plan(cluster(("V100-32GB", 2), ("RTX-A6000", 2)), bert_base, 256, 512)
    assert (plan.zero_stage, plan.engine) == (0, "ddp")


def test_big_model_gets_the_smallest_stage_that_fits() -> None:
    from transformers import LlamaConfig

    llama_1b = LlamaConfig(
        vocab_size=32000,
        hidden_size=2048,
        intermediate_size=5632,
        num_hidden_layers=22,
        num_attention_heads=32,
        num_key_value_heads=4,
    )
    plan = make_plan(cluster(("V100-32GB", 2), ("V100-32GB", 2)), llama_1b, 64, 1024)
    assert (plan.zero_stage, plan.engine) == (1, "zero1")  # 1.1B x 18 B > half of 28.6 GiB
    plan = make_plan(cluster(("T4", 4)), llama_1b, 64, 1024)
    assert (plan.zero_stage, plan.engine) == (2, "fsdp2")
    plan = make_plan(cluster(("T4", 4)), llama_1b, 64, 1024, engine="deepspeed")
    assert plan.engine == "deepspeed" and plan.zero_stage >= 1
    with pytest.raises(HetlmError, match="does not fit on rank 0"):
        make_plan(cluster(("T4", 1)), llama_1b, 8, 1024)


def test_explicit_stage_and_engine_conflicts(bert_base: ModelShape) -> None:
    two = cluster(("A100-40GB", 2))
    plan = make_plan(two, bert_base, 64, 128, zero_stage=3)
    assert (plan.zero_stage, plan.engine) == (3, "fsdp2")
    assert make_plan(two, bert_base, 64, 128, zero_stage="1").engine == "zero1"
    with pytest.raises(HetlmError, match="engine ddp cannot run ZeRO stage 2.*--engine fsdp2"):
        make_plan(two, bert_base, 64, 128, zero_stage=2, engine="ddp")
    with pytest.raises(HetlmError, match="engine must be"):
        make_plan(two, bert_base, 64, 128, engine="megatron")


def test_communication_volumes() -> None:
    psi = 1_000_000
    assert comm_bytes(0, "ddp", psi, "fp32", 1, 1) == 0
    assert comm_bytes(0, "ddp", psi, "bf16", 4, 8) == pytest.approx(2 * 0.75 * 4 * psi)
    assert comm_bytes(0, "deepspeed", psi, "bf16", 4, 1) == pytest.approx(2 * 0.75 * 2 * psi)
    # ZeRO paper: stages 1/2 move what DDP moves, stage 3 1.5x (one micro-step).
    ds = [comm_bytes(s, "deepspeed", psi, "fp16", 4, 1) for s in range(4)]
    assert ds[1] == ds[2] == ds[0] and ds[3] == pytest.approx(1.5 * ds[0])
    assert comm_bytes(3, "fsdp2", psi, "bf16", 4, 4) > comm_bytes(3, "fsdp2", psi, "bf16", 4, 1)


def test_slow_network_dominates_step_time(bert_base: ModelShape) -> None:
    two_nodes = cluster(("V100-32GB", 2), ("V100-32GB", 2), inter_node_gbps=10)
    one_node = cluster(("V100-32GB", 4))
    slow = make_plan(two_nodes, bert_base, 256, 512)
    fast = make_plan(one_node, bert_base, 256, 512)
    assert slow.ranks[0].comm_s == pytest.approx(10 * fast.ranks[0].comm_s)
    assert slow.step_s > fast.step_s


# --------------------------------------------------------------------------- plan file


def test_plan_round_trip(tmp_path: Path, bert_small: ModelShape) -> None:
    plan = make_plan(cluster(("V100-32GB", 2), ("RTX-A6000", 1)), bert_small, 100, 128)
    path = plan.save(tmp_path / "runs" / "plan.yaml")
    loaded = load_plan(path)
    assert loaded == plan
    assert loaded.batch_split == plan.batch_split and loaded.batch_split.global_batch == 100
    assert plan.to_dict() == type(plan).from_dict(plan.to_dict()).to_dict()
    assert "format: hetlm-plan/1" in path.read_text()


def test_corrupt_plans_are_refused(tmp_path: Path, bert_small: ModelShape) -> None:
    plan = make_plan(cluster(("T4", 2)), bert_small, 64, 128)
    data = plan.to_dict()
    data["ranks"][0]["share"] += 1
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(data))
    with pytest.raises(HetlmError, match="sum to 65, not the global batch 64"):
        load_plan(bad)
    data = plan.to_dict()
    data["ranks"][1]["micro_batchs"] = [1]
    bad.write_text(yaml.safe_dump(data))
    with pytest.raises(HetlmError, match=r"ranks\.1\.micro_batchs: unknown key"):
        load_plan(bad)
    with pytest.raises(HetlmError, match="does not exist"):
        load_plan(tmp_path / "none.yaml")
    bad.write_text("ranks: [\n")
    with pytest.raises(HetlmError, match="not valid YAML"):
        load_plan(bad)
    bad.write_text("")
    with pytest.raises(HetlmError, match="empty"):
        load_plan(bad)


def test_topology_mismatch_is_refused(bert_small: ModelShape) -> None:
    plan = make_plan(cluster(("T4", 2), ("T4", 2)), bert_small, 64, 128)
    plan.check_topology(4, [2, 2])
    plan.check_topology(4)
    with pytest.raises(HetlmError) as info:
        plan.check_topology(3, [2, 1])
    assert str(info.value).startswith(
        "the plan is for 4 ranks on 2 nodes (2+2) but 3 were launched on 2 nodes (2+1)"
    )
    with pytest.raises(HetlmError, match="4 were launched on 1 nodes"):
        plan.check_topology(4, [4])
    plan.check_device(0, 15 * 2**30)
    with pytest.raises(HetlmError, match="rank 1 .* 8.0 GiB but the plan assumed T4"):
        plan.check_device(1, 8 * 2**30)


# --------------------------------------------------------------------------- FLOPs, GPU-days


def test_flops_per_sample_is_6n_plus_attention_plus_head(bert_base: ModelShape) -> None:
    s, h, layers = 512, 768, 12
    expected = s * (6 * bert_base.layer_params * layers + 12 * layers * s * h) + math.ceil(
        0.15 * s
    ) * 6 * (h * 32000 + h * h)
    assert flops_per_sample(bert_base, s) == expected


def test_gpu_days_for_bert_base() -> None:
    config = bert_config("base", 30522)
    days = estimate_gpu_days(config, 1_000_000, 256, 512, "V100-32GB", "fp16", 0.4)
    assert 15 < days < 25  # ~7.7e19 FLOPs at 40% of 125 TFLOP/s
    assert estimate_gpu_days(
        config, 1_000_000, 256, 512, "V100-32GB", "fp16", 0.2
    ) == pytest.approx(2 * days)
    with pytest.raises(HetlmError, match="does not support bf16"):
        estimate_gpu_days(config, 10, 8, 128, "V100-32GB", "bf16")


def test_micro_batch_display() -> None:
    assert format_micro_batches([30, 30]) == "30x2"
    assert format_micro_batches([31, 31, 30]) == "31x2+30"
    assert format_micro_batches([7]) == "7"


# --------------------------------------------------------------------------- hetlm sft (LoRA)


def _llama(preset: str):
    from hetlm.models.presets import model_config

    return model_config(
        "llama", preset, vocab_size=32000, max_position_embeddings=2048, pad_token_id=0
    )


def test_sft_plan_gives_per_rank_micro_batches(tmp_path: Path) -> None:
    from hetlm.cluster.memory_lora import LoraSpec
    from hetlm.launch.scripts import torchrun_commands

    c = cluster(("V100-32GB", 2), ("RTX-A6000", 2))
    plan = make_plan(
        c, _llama("7b"), 64, 512, model_name="llama-7b", lora=LoraSpec(r=16, quantization="4bit")
    )
    assert plan.task == "sft" and plan.lora["quantization"] == "4bit"
    assert plan.lora["trainable_params"] == 39_976_960
    assert sum(r.share for r in plan.ranks) == 64
    assert all(len(r.micro_batches) == plan.micro_steps for r in plan.ranks)
    v100, a6000 = plan.ranks[0], plan.ranks[2]
    assert 1 <= v100.cap < a6000.cap  # more memory, more samples per micro-step
    assert v100.precision == "fp16" and plan.engine == "ddp"
    assert all(r.est_memory_gib <= 0.9 * r.memory_gib for r in plan.ranks)
    loaded = load_plan(plan.save(tmp_path / "plan.yaml"))
    assert loaded == plan
    assert " -m hetlm.cli sft " in torchrun_commands(loaded)[0]
    assert "LoRA r 16 on all-linear" in plan.format_table()


def test_sft_plan_memory_follows_the_base() -> None:
    from hetlm.cluster.memory_lora import LoraSpec

    c = cluster(("A100-80GB", 1))
    caps = [
        make_plan(c, _llama("7b"), 8, 512, lora=spec).ranks[0].cap
        for spec in (
            LoraSpec(base_dtype="fp32"),
            LoraSpec(base_dtype="16bit"),
            LoraSpec(quantization="4bit"),
            LoraSpec(quantization="4bit", gradient_checkpointing=True),
        )
    ]
    assert caps == sorted(caps) and caps[0] < caps[-1]


def test_sft_plan_refusals_name_the_fix() -> None:
    from hetlm.cluster.memory_lora import LoraSpec

    with pytest.raises(HetlmError, match=r"does not fit .*--quantization 4bit"):
        make_plan(cluster(("T4", 1)), _llama("13b"), 8, 512, lora=LoraSpec(base_dtype="fp32"))
    with pytest.raises(HetlmError, match="FSDP2"):
        make_plan(
            cluster(("A100-80GB", 2)),
            _llama("1b"),
            8,
            512,
            zero_stage=3,
            lora=LoraSpec(quantization="4bit"),
        )
    # auto never shards a quantized base: DDP on every rank
    plan = make_plan(
        cluster(("T4", 2)),
        _llama("7b"),
        8,
        512,
        lora=LoraSpec(quantization="4bit", gradient_checkpointing=True),
    )
    assert plan.zero_stage == 0


def test_plans_are_for_their_command(tmp_path: Path) -> None:
    from hetlm.cluster.memory_lora import LoraSpec
    from hetlm.config import parse_config
    from hetlm.sft.config import parse_sft_config

    c = cluster(("A100-80GB", 1))
    sft_plan = make_plan(c, _llama("tiny"), 8, 256, lora=LoraSpec()).save(tmp_path / "sft.yaml")
    pre_plan = make_plan(c, bert_config("tiny", 1000), 8, 128).save(tmp_path / "pre.yaml")
    train = {"global_batch": 8, "max_steps": 1}
    pretrain = parse_config(
        {
            "run": {"output_dir": "x"},
            "data": {"dataset": "d"},
            "train": {**train, "plan": str(sft_plan)},
        }
    )
    with pytest.raises(HetlmError, match="made for hetlm sft.*--task pretrain"):
        pretrain.load_plan()
    sft = {"run": {"output_dir": "x"}, "model": {"path": "m"}, "data": {"source": "s"}}
    with pytest.raises(HetlmError, match="made for hetlm pretrain.*--task sft"):
        parse_sft_config({**sft, "train": {**train, "plan": str(pre_plan)}}).load_plan()
    longer = parse_sft_config(
        {
            **sft,
            "data": {"source": "s", "max_length": 512},
            "train": {**train, "plan": str(sft_plan)},
        }
    )
    with pytest.raises(HetlmError, match="max_length 256 .* --max-length 512"):
        longer.load_plan()
    assert (
        parse_sft_config(
            {
                **sft,
                "data": {"source": "s", "max_length": 256},
                "train": {**train, "plan": str(sft_plan)},
            }
        )
        .load_plan()
        .task
        == "sft"
    )
    other = parse_sft_config(
        {
            **sft,
            "model": {"path": "m", "gradient_checkpointing": True},
            "data": {"source": "s", "max_length": 256},
            "lora": {"r": 8},
            "train": {**train, "plan": str(sft_plan)},
        }
    )
    with pytest.raises(
        HetlmError,
        match=r"other LoRA settings: r 16 \(this config: 8\); "
        r"gradient_checkpointing False",
    ):
        other.load_plan()


@pytest.mark.parametrize(
    "gpu, precision, held",
    [("A100-80GB", "bf16", "bf16"), ("A100-80GB", "fp16", "fp32"), ("cpu", "bf16", "fp32")],
)
def test_sft_loads_the_frozen_base_as_the_planner_sizes_it(gpu, precision, held) -> None:
    """One rule (hetlm.cluster.precision): bf16 on GPUs training in bf16, else fp32."""
    import torch

    from hetlm.cluster.precision import frozen_base_precision
    from hetlm.commands.plan import sft_base_dtype
    from hetlm.sft.train import frozen_base_dtype

    on_gpu = gpu != "cpu"
    assert frozen_base_precision(on_gpu, precision) == held
    device = torch.device("cuda" if on_gpu else "cpu")
    loaded = {"bf16": torch.bfloat16, "fp32": torch.float32}[held]
    assert frozen_base_dtype(device, precision) == loaded
    assert sft_base_dtype(cluster((gpu, 2)), precision) == {"bf16": "16bit", "fp32": "fp32"}[held]


def test_a_config_reads_its_plan_file_once(tmp_path: Path, monkeypatch) -> None:
    """Start-up asks for the plan several times (the split, the run plan, the elastic split):
    the file is read once per config, the checks against the config run every time, and the
    cached plan is not part of the config's dump (its record and fingerprints)."""
    from hetlm.cluster import planner
    from hetlm.config import parse_config

    c = cluster(("A100-80GB", 1))
    first = make_plan(c, bert_config("tiny", 1000), 8, 128).save(tmp_path / "a.yaml")
    second = make_plan(c, bert_config("tiny", 1000), 8, 128).save(tmp_path / "b.yaml")
    reads: list[Path] = []
    real = planner.load_plan
    monkeypatch.setattr(planner, "load_plan", lambda path: reads.append(path) or real(path))
    config = parse_config(
        {
            "run": {"output_dir": "x"},
            "data": {"dataset": "d"},
            "train": {"global_batch": 8, "max_steps": 1, "plan": str(first)},
        }
    )
    dump = config.model_dump(mode="json")
    split = config.batch_split(1, [0])
    assert config.load_plan().batch_split == split
    assert config.load_plan() is config.load_plan()
    assert reads == [first]
    assert config.model_dump(mode="json") == dump
    config.train.global_batch = 16  # checked against the config again, not read again
    with pytest.raises(HetlmError, match="for global batch 8 but train.global_batch is 16"):
        config.load_plan()
    assert reads == [first]
    config.train.global_batch = 8
    config.train.plan = second  # another file: read
    assert config.load_plan().global_batch == 8
    assert reads == [first, second]


def test_cli_plans_sft_from_options_and_from_an_sft_config(tmp_path: Path, capsys) -> None:
    from hetlm.cli import main

    spec = tmp_path / "cluster.yaml"
    spec.write_text(
        "nodes:\n  - gpus: {model: RTX-A6000, count: 1}\n  - gpus: {model: T4, count: 1}\n",
        encoding="utf-8",
    )
    out = tmp_path / "plan.yaml"
    assert (
        main(
            [
                "plan",
                str(spec),
                "--task",
                "sft",
                "--model",
                "llama-7b",
                "--global-batch",
                "16",
                "--max-length",
                "512",
                "--quantization",
                "4bit",
                "--lora-r",
                "8",
                "--output",
                str(out),
            ]
        )
        == 0
    )
    plan = load_plan(out)
    assert plan.task == "sft" and plan.lora["r"] == 8 and plan.seq_len == 512
    assert "-m hetlm.cli sft" in capsys.readouterr().out
    config = tmp_path / "sft.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "run": {"output_dir": "runs/sft"},
                "model": {"path": "llama", "quantization": "8bit", "gradient_checkpointing": True},
                "data": {"source": "x.jsonl", "max_length": 256},
                "lora": {"r": 4, "target_modules": ["q_proj", "v_proj"]},
                "train": {"global_batch": 12, "max_steps": 1},
            }
        ),
        encoding="utf-8",
    )
    assert (
        main(
            [
                "plan",
                str(spec),
                "--sft-config",
                str(config),
                "--model",
                "llama-1b",
                "--output",
                str(out),
            ]
        )
        == 0
    )
    plan = load_plan(out)
    assert (plan.global_batch, plan.seq_len, plan.lora["quantization"]) == (12, 256, "8bit")
    assert plan.lora["target_modules"] == ["q_proj", "v_proj"]
    assert plan.lora["gradient_checkpointing"] is True
    assert (
        main(
            [
                "plan",
                str(spec),
                "--model",
                "bert-tiny",
                "--global-batch",
                "8",
                "--seq-len",
                "64",
                "--quantization",
                "4bit",
                "--output",
                str(out),
            ]
        )
        == 2
    )
    assert "add --task sft" in capsys.readouterr().err


def test_fits_table_is_computed_and_in_the_docs() -> None:
    from hetlm.cluster.fits import fits, format_fits

    cells = fits()
    by = {(c.model, c.base, c.gpu): c for c in cells}
    # the reference work: LLaMA-13B LoRA on one A100, an 8-bit model served on a 15 GB T4
    assert by[("13b", "bf16/fp16", "A100-80GB")].micro_batch >= 1
    assert by[("7b", "8-bit", "T4")].serve_gib <= 15 * 0.9
    assert by[("13b", "fp32 + autocast", "T4")].micro_batch_gc == 0
    table = format_fits(cells)
    docs = (Path(__file__).resolve().parents[1] / "docs" / "SFT.md").read_text(encoding="utf-8")
    assert table in docs, "docs/SFT.md's table is stale: paste `hetlm plan --fits` into it"
