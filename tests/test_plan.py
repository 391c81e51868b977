"""`cfgpar plan` and the layout cost model behind it: no processes, no model weights."""

import json
import shlex
import shutil
from pathlib import Path

import pytest

import cfgpar
from cfgpar import cli
from cfgpar.bench import cost_model
from cfgpar.bench import layout_model as lm

ASSETS = Path(cfgpar.__file__).parent / "assets"
NVLINK, PCIE = lm.INTERCONNECTS["nvlink"], lm.INTERCONNECTS["pcie"]
EDIT = lm.QWEN_IMAGE_EDIT


def by_layout(px: int, gpus: int, link: lm.Interconnect) -> dict[lm.Layout, lm.LayoutPrediction]:
    return {p.layout: p for p in lm.rank_layouts(EDIT, lm.workload(EDIT, px, px, 50), gpus, link)}


@pytest.mark.parametrize("gpus", [1, 2, 3, 4, 6, 7, 8, 12, 16])
@pytest.mark.parametrize("branches", [2, 3])
def test_layouts_are_every_valid_degree_triple_once(gpus, branches):
    heads = 24
    found = lm.layouts(gpus, heads, branches)
    for lay in found:
        assert lay.cfg * lay.ulysses * lay.ring == gpus
        assert heads % lay.ulysses == 0
        assert 1 <= lay.cfg <= min(branches, gpus)
    brute = {(c, u, gpus // (c * u)) for c in range(1, branches + 1) for u in range(1, gpus + 1)
             if gpus % (c * u) == 0 and heads % u == 0}
    assert sorted((lay.cfg, lay.ulysses, lay.ring) for lay in found) == sorted(brute)


@pytest.mark.parametrize("px,gpus,link", [(1024, 4, NVLINK), (2048, 8, NVLINK), (2048, 8, PCIE), (1536, 6, PCIE)])
def test_ranking_is_by_predicted_end_to_end_time(px, gpus, link):
    ranked = lm.rank_layouts(EDIT, lm.workload(EDIT, px, px, 50), gpus, link)
    totals = [p.total_s for p in ranked]
    assert totals == sorted(totals)
    one = lm.predict_layout(EDIT, lm.workload(EDIT, px, px, 50), lm.Layout(), link).total_s
    assert all(p.speedup == pytest.approx(one / p.total_s) for p in ranked)


def test_one_gpu_reproduces_the_published_times_and_cfg_alone_the_cfg_cost_model():
    for model, published in ((EDIT, 32.833), (lm.QWEN_IMAGE, 12.770)):
        assert lm.predict_layout(model, lm.workload(model, 1024, 1024, 50), lm.Layout(), NVLINK).total_s == \
            pytest.approx(published, rel=1e-6)
    costs = cost_model.GPU_SCENARIOS["Qwen-Image-Edit 1024x1024, 50 steps, H100"]
    cfg2 = lm.predict_layout(EDIT, lm.workload(EDIT, 1024, 1024, 50), lm.Layout(cfg=2), NVLINK)
    assert cfg2.total_s == pytest.approx(cost_model.predict(costs, 2).total_s, rel=1e-3)
    assert cfg2.comm_share < 1e-3  # one small all-gather a step


def test_sequence_parallelism_helps_more_at_2048_than_at_1024():
    for gpus in (4, 8):
        small, large = by_layout(1024, gpus, NVLINK), by_layout(2048, gpus, NVLINK)
        for lay in small:
            if lay.ulysses * lay.ring > 1:
                assert large[lay].speedup > small[lay].speedup, lay
                assert large[lay].comm_share < small[lay].comm_share, lay


@pytest.mark.parametrize("px", [1024, 2048])
def test_pcie_ranks_ulysses_heavy_layouts_lower_than_nvlink(px):
    nv, pc = by_layout(px, 4, NVLINK), by_layout(px, 4, PCIE)
    best_nv, best_pc = min(p.total_s for p in nv.values()), min(p.total_s for p in pc.values())
    heavy = [lay for lay in nv if lay.ulysses > lay.cfg]  # Ulysses spans more ranks than CFG
    assert heavy
    for lay in heavy:
        assert pc[lay].total_s / best_pc > nv[lay].total_s / best_nv, lay
        assert pc[lay].comm_share > nv[lay].comm_share, lay


def test_the_image_free_third_branch_is_cheaper():
    load = lm.workload(EDIT, 1024, 1024, 50, branches=3)
    (image, text), _, (image3, text3) = load.branch_tokens()
    assert image3 == image - 4096 and text3 < text
    assert lm.rank_layouts(EDIT, load, 3, NVLINK)[0].layout == lm.Layout(cfg=3)


# ---- cfgpar plan ------------------------------------------------------------------------------
def plan(capsys, *args):
    rc = cli.main(["plan", *map(str, args)])
    out = capsys.readouterr()
    return rc, out.out, out.err


def test_plan_on_the_tiny_edit_model_prints_the_ranked_table_and_the_best_command(capsys):
    rc, out, err = plan(capsys, "--gpus", 8, "--model", ASSETS / "shapes-edit", "--size", "512x512")
    assert rc == 0 and not err
    lines = out.splitlines()
    head = next(i for i, line in enumerate(lines) if line.split()[:2] == ["rank", "layout"])
    rows = lines[head + 1: head + 1 + len(lm.layouts(8, 4, 2))]  # the tiny model has 4 heads
    assert [int(row.split()[0]) for row in rows] == list(range(1, len(rows) + 1))
    totals = [float(row.split()[-3]) for row in rows]
    assert totals == sorted(totals)
    best = lines[-1]
    assert best.startswith("best: cfgpar edit --image IN.png --prompt")
    assert "--vae-patch-parallel-size 8" in best and f"--model {ASSETS / 'shapes-edit'}" in best
    words = [w for w in rows[0].split()[1:-4] if w != "x"]  # e.g. cfg 2 x ring 4: the fastest layout
    flags = {"cfg": "--cfg-parallel-size", "ulysses": "--ulysses-degree", "ring": "--ring-degree"}
    for name, value in zip(words[::2], words[1::2]):
        assert f"{flags[name]} {value}" in best
    parsed = cli.build_parser().parse_args(shlex.split(best.removeprefix("best: cfgpar ")))  # a command cfgpar takes
    assert parsed.cfg_parallel_size * parsed.ulysses_degree * parsed.ring_degree == 8


def test_plan_without_a_model_is_qwen_image_edit_offline(capsys):
    rc, out, _ = plan(capsys, "--gpus", 4, "--size", "2048x2048")
    assert rc == 0
    assert out.startswith("Qwen/Qwen-Image-Edit (edit), 2048x2048")
    assert "cfgpar edit" in out.splitlines()[-1] and "--cfg-parallel-size 2 --ulysses-degree 2" in out


def test_plan_for_a_text_to_image_model_gives_a_generate_command(capsys):
    rc, out, _ = plan(capsys, "--gpus", 2, "--model", ASSETS / "shapes-t2i", "--interconnect", "pcie")
    assert rc == 0 and out.splitlines()[-1].startswith("best: cfgpar generate --prompt")


def test_plan_fetches_only_the_two_config_files_of_a_hub_id(capsys, monkeypatch):
    import huggingface_hub

    asked = []

    def fake_download(repo_id, filename, **_):
        asked.append((repo_id, filename))
        return str(ASSETS / "shapes-edit" / filename)

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake_download)
    rc, out, _ = plan(capsys, "--gpus", 2, "--model", "someone/tiny-edit")
    assert rc == 0 and "--model someone/tiny-edit" in out
    assert asked == [("someone/tiny-edit", "model_index.json"), ("someone/tiny-edit", "transformer/config.json")]


def folder_without_transformer(tmp_path):
    shutil.copy(ASSETS / "shapes-edit" / "model_index.json", tmp_path / "model_index.json")
    return tmp_path


def folder_with_pipeline(tmp_path, class_name):
    shutil.copytree(ASSETS / "shapes-edit" / "transformer", tmp_path / "transformer")
    (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": class_name}))
    return tmp_path


@pytest.mark.parametrize("args,says", [
    (["--gpus", 0], "--gpus must be between 1 and 256, got 0."),
    (["--gpus", 8, "--size", "100x"], "--size must be WIDTHxHEIGHT in px"),
    (["--gpus", 8, "--size", "8x8"], "each at least 16"),
    (["--gpus", 8, "--steps", 0], "--steps must be at least 1"),
    (["--gpus", 4, "--model", "cfgpar-test/no-such-model"], "could not fetch model_index.json of 'cfgpar-test/"),
    (["--gpus", 4, "--model", "no-such-folder"], "neither a model folder nor a hub repo id"),
    (["--gpus", 4, "--model", ASSETS / "shapes-t2i", "--image-guidance"], "--image-guidance needs an edit model"),
    (["--gpus", 4, "--model", folder_without_transformer], "has no transformer/config.json"),
    (["--gpus", 4, "--model", lambda p: folder_with_pipeline(p, "FluxPipeline")], "has pipeline 'FluxPipeline'"),
])
def test_plan_says_what_was_wrong_in_one_sentence(capsys, tmp_path, args, says):
    args = [a(tmp_path) if callable(a) else a for a in args]
    rc, out, err = plan(capsys, *args)
    assert rc == 2 and not out
    assert err.startswith("cfgpar: error: ") and says in err and len(err.strip().splitlines()) == 1
