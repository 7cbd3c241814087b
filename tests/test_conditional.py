"""Class-conditional models with classifier-free guidance: the spec, the guided samplers, the
balanced evaluation labels, the registered model, and train -> optimize -> load through the CLI."""
from __future__ import annotations

import json
import math

import mlflow
import pytest
import torch
from torch import nn
from typer.testing import CliRunner

from lcsc_ops.cli import app
from lcsc_ops.errors import LcscError
from lcsc_ops.evaluation.conditional import class_accuracy, make_labels
from lcsc_ops.evaluation.features import build_extractor
from lcsc_ops.evaluation.fid import sample_in_batches
from lcsc_ops.models.consistency import ConsistencySampler
from lcsc_ops.models.diffusion import DDIMSampler, make_sampler
from lcsc_ops.models.dpm_solver import DPMSolverSampler
from lcsc_ops.models.sampling import Guidance, cfg_combine, denoiser_output, guidance_for
from lcsc_ops.models.unet import DigitsUNet
from lcsc_ops.spec import Conditioning, ModelSpec
from lcsc_ops.store.pyfunc import Generator, signature

runner = CliRunner()
COND = {"num_classes": 10, "null_label": 10, "guidance": 2.5, "labels": "balanced", "label_keyword": None}
UNET = "lcsc_ops.models.unet:digits_unet"


def _spec(**cond) -> ModelSpec:
    return ModelSpec(factory=UNET, kwargs={"channels": 8, "num_classes": 10}, sampler={"name": "ddim", "steps": 2},
                     conditioning={**COND, **cond})


# -- the spec ------------------------------------------------------------------------------------


def test_spec_round_trips_and_unconditional_specs_are_unchanged():
    spec = _spec()
    assert isinstance(spec.conditioning, Conditioning) and spec.conditioning.to_dict() == COND
    assert ModelSpec.from_dict(json.loads(spec.to_json())) == spec
    assert ModelSpec.from_dict(spec.to_dict()).conditioning == spec.conditioning
    plain = ModelSpec(factory=UNET)
    assert "conditioning" not in plain.to_dict()  # the JSON (and the score-cache keys) of existing specs
    assert plain.to_json() == ('{"dataset": "digits", "factory": "lcsc_ops.models.unet:digits_unet", '
                               '"image_shape": [1, 8, 8], "kwargs": {}, "sampler": {"name": "ddim", "steps": 10}, '
                               '"version": 1}')
    assert ModelSpec.from_dict({**plain.to_dict(), "conditioning": None}) == plain
    assert spec.with_guidance(4).conditioning.guidance == 4.0 and spec.conditioning.guidance == 2.5
    with pytest.raises(LcscError, match="no conditioning"):
        plain.with_guidance(2.0)


@pytest.mark.parametrize("cond, field", [
    ({"num_classes": 0}, "conditioning.num_classes"),
    ({"num_classes": True}, "conditioning.num_classes"),
    ({"num_classes": 10, "null_label": 3}, "conditioning.null_label"),
    ({"num_classes": 10, "null_label": 10, "guidance": -1}, "conditioning.guidance"),
    ({"num_classes": 10, "null_label": 10, "guidance": float("nan")}, "conditioning.guidance"),
    ({"num_classes": 10, "null_label": 10, "guidance": "2"}, "conditioning.guidance"),
    ({"num_classes": 10, "guidance": 2.0}, "needs a null_label"),
    ({"num_classes": 10, "labels": "random"}, "conditioning.labels"),
    ({"num_classes": 10, "label_keyword": "class-labels"}, "conditioning.label_keyword"),
    ({"num_classes": 10, "colour": 1}, "unknown field 'colour'"),
    ({"null_label": 10}, "lacks 'num_classes'"),
    (5, "conditioning must be a JSON object"),
])
def test_bad_conditioning_is_one_error_naming_the_field(cond, field):
    data = {**ModelSpec(factory=UNET).to_dict(), "conditioning": cond}
    with pytest.raises(LcscError, match=field):
        ModelSpec.from_dict(data, origin="run x")


# -- guidance ------------------------------------------------------------------------------------


class Toy(nn.Module):
    """An elementwise 'denoiser' whose output depends on the label; records every call's batch."""

    def __init__(self, keyword: str | None = None) -> None:
        super().__init__()
        self.keyword, self.calls = keyword, []

    def forward(self, x, t, y=None, **kw):
        y = kw.get(self.keyword, y) if self.keyword else y
        self.calls.append(None if y is None else y.clone())
        shift = torch.zeros(x.shape[0]) if y is None else (y.float() + 1) / 7
        t = torch.as_tensor(t).float().expand(x.shape[0])
        return 0.3 * x + (shift + 1e-4 * t).view(-1, *([1] * (x.dim() - 1)))


class Fixed(nn.Module):
    """``toy`` with the labels fixed, guided by hand from separate conditional and unconditional calls."""

    def __init__(self, toy: Toy, labels: torch.Tensor, null: int, scale: float | None) -> None:
        super().__init__()
        self.toy, self.labels, self.null, self.scale = toy, labels, null, scale

    def forward(self, x, t):
        cond = self.toy(x, t, self.labels)
        if self.scale is None:
            return cond
        return cfg_combine(cond, self.toy(x, t, torch.full_like(self.labels, self.null)), self.scale)


def test_cfg_is_exact_at_0_and_1_and_one_batched_forward_otherwise():
    toy, x, t = Toy(), torch.randn(6, 1, 4, 4), torch.full((6,), 500)
    y, null = torch.tensor([0, 1, 2, 3, 4, 5]), torch.full((6,), 10)
    g = lambda w: Guidance(y, w, 10)  # noqa: E731
    assert torch.equal(denoiser_output(toy, x, t, g(1.0)), toy(x, t, y))
    assert torch.equal(denoiser_output(toy, x, t, g(0.0)), toy(x, t, null))
    toy.calls.clear()
    guided = denoiser_output(toy, x, t, g(2.5))
    assert len(toy.calls) == 1 and torch.equal(toy.calls[0], torch.cat([y, null]))  # cond + uncond, one forward
    cond, uncond = toy(x, t, y), toy(x, t, null)
    assert torch.equal(guided, uncond + 2.5 * (cond - uncond))
    assert torch.equal(denoiser_output(toy, x, t), toy(x, t))  # unconditional: model(x, t) as before
    with pytest.raises(LcscError, match="null label"):
        denoiser_output(toy, x, t, Guidance(y, 2.0))
    with pytest.raises(LcscError, match="labels for a batch of 6"):
        denoiser_output(toy, x, t, Guidance(y[:3]))


SAMPLERS = [DDIMSampler(steps=3), DPMSolverSampler(steps=3), ConsistencySampler(steps=2)]


@pytest.mark.parametrize("sampler", SAMPLERS, ids=lambda s: type(s).__name__)
@pytest.mark.parametrize("scale", [0.0, 1.0, 3.0])
def test_samplers_pass_the_labels_and_apply_cfg(sampler, scale):
    toy, labels = Toy(), make_labels(5, 10, 0)
    noise = torch.randn(5, 1, 4, 4, generator=torch.Generator().manual_seed(0))
    got = sampler.sample(toy, noise, Guidance(labels, scale, 10))
    if scale == 0.0:
        want = sampler.sample(Fixed(toy, torch.full_like(labels, 10), 10, None), noise)
    else:
        want = sampler.sample(Fixed(toy, labels, 10, None if scale == 1.0 else scale), noise)
    assert torch.equal(got, want)
    toy.calls.clear()
    sampler.sample(toy, noise, Guidance(labels, 3.0, 10))
    assert len(toy.calls) == sampler.nfe and all(torch.equal(c, torch.cat([labels, torch.full((5,), 10)]))
                                                 for c in toy.calls)


def test_training_loss_gives_the_model_its_labels():
    for sampler in (DDIMSampler(steps=2), DPMSolverSampler(steps=2), ConsistencySampler()):
        toy, labels = Toy(), torch.tensor([3, 10, 1])
        sampler.training_loss(toy, torch.zeros(3, 1, 4, 4), torch.Generator().manual_seed(0), guidance=Guidance(labels))
        assert toy.calls and all(torch.equal(c, labels) for c in toy.calls)


def test_diffusers_sampler_passes_class_labels():
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(0)
    unet = diffusers.UNet2DModel(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(8, 16),
                                 layers_per_block=1, down_block_types=("DownBlock2D", "DownBlock2D"),
                                 up_block_types=("UpBlock2D", "UpBlock2D"), norm_num_groups=4, num_class_embeds=11)
    seen = []
    unet.register_forward_pre_hook(lambda m, args, kwargs: seen.append(kwargs.get("class_labels")),
                                   with_kwargs=True)
    sampler = make_sampler({"name": "diffusers", "steps": 2})
    noise, labels = torch.randn(4, 1, 8, 8), torch.tensor([3, 3, 7, 0])
    cond = Conditioning(num_classes=10, null_label=10, guidance=2.0, label_keyword="class_labels")
    images = sampler.sample(unet, noise, guidance_for(cond, labels))
    assert images.shape == (4, 1, 8, 8) and len(seen) == 2
    assert all(torch.equal(s, torch.cat([labels, torch.full((4,), 10)])) for s in seen)
    with pytest.raises(ValueError):  # a conditional UNet2DModel needs class labels: they are what reaches it
        sampler.sample(unet, noise)


def _tiny_conditional_unet(seed: int = 0):
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(seed)
    return diffusers.UNet2DModel(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(8, 16),
                                 layers_per_block=1, down_block_types=("DownBlock2D", "DownBlock2D"),
                                 up_block_types=("UpBlock2D", "UpBlock2D"), norm_num_groups=4, num_class_embeds=11)


def test_a_conditional_diffusers_folder_imports_and_samples_conditionally(store, tmp_path):
    from lcsc_ops.importers.diffusers import diffusers_conditioning
    from lcsc_ops.math.merge import load_checkpoint_state
    from lcsc_ops.store.fetch import fetch_window

    for step in (10, 20):
        _tiny_conditional_unet(seed=step).save_pretrained(tmp_path / "models" / f"unet-step{step}")
    assert diffusers_conditioning({"num_class_embeds": 11}).to_dict() == {
        "num_classes": 11, "null_label": None, "guidance": 1.0, "labels": "balanced", "label_keyword": "class_labels"}
    assert diffusers_conditioning({"num_class_embeds": None}) is None
    assert diffusers_conditioning({"num_class_embeds": 4, "class_embed_type": "timestep"}) is None
    base = ["import", str(tmp_path / "models"), "--step-pattern", r"step(\d+)", "--sampler-steps", "2",
            "--tracking-uri", store["uri"]]
    bad = runner.invoke(app, [*base, "--conditioning", '{"null_label": 10, "guidance": 2}'])
    assert bad.exit_code == 1 and "conditioning.null_label" in bad.output  # 11 classes: 10 is one of them
    run_id = _invoke([*base, "--conditioning", '{"num_classes": 10, "null_label": 10, "guidance": 2}'])
    window = fetch_window(run_id.strip().splitlines()[-1], window=2, tracking_uri=store["uri"],
                          cache_dir=store["cache"])
    assert window.spec.conditioning == Conditioning(10, 10, 2.0, label_keyword="class_labels")
    model = load_checkpoint_state(window.spec.build(), window.entries[-1].load())
    seen = []
    model.register_forward_pre_hook(lambda m, args, kwargs: seen.append(kwargs["class_labels"]), with_kwargs=True)
    images = Generator(model, window.spec).sample(3, seed=0, label=3)
    assert images.shape == (3, 1, 8, 8) and len(seen) == 2
    assert all(torch.equal(y, torch.tensor([3, 3, 3, 10, 10, 10])) for y in seen)  # guided: cond + null


def test_pruning_rungs_sample_with_the_same_labels(tmp_path):
    from lcsc_ops.evaluation.fid import FIDScorer, compute_reference_stats
    from lcsc_ops.evaluation.data import load_digits_images
    from lcsc_ops.evaluation.rungs import fid_rungs

    spec = _spec()
    torch.manual_seed(0)
    model, extractor = spec.build().eval(), build_extractor("digits-cnn")
    stats = compute_reference_stats(load_digits_images(), extractor)
    scorer = FIDScorer(make_sampler(spec.sampler), extractor, stats, image_shape=(1, 8, 8), batch_size=20,
                       conditioning=spec.conditioning)
    assert scorer.guidance(40, 1).labels.tolist() == make_labels(40, 10, 1).tolist()
    *_, last = fid_rungs(scorer, model, [20, 40], [1])
    assert last == scorer(model, 40, 1)  # the last rung is the search objective, labels included
    scorer.guidance_scale = 1.0
    assert scorer(model, 40, 1) != last


def test_digits_unet_without_classes_is_unchanged_and_with_them_reads_the_null_label():
    plain = DigitsUNet(channels=8)
    assert not any("label" in k for k in plain.state_dict())
    with pytest.raises(LcscError, match="unconditional"):
        plain(torch.zeros(2, 1, 8, 8), torch.zeros(2, dtype=torch.long), torch.zeros(2, dtype=torch.long))
    cond = DigitsUNet(channels=8, num_classes=10).eval()
    x, t = torch.randn(2, 1, 8, 8), torch.tensor([10, 900])
    assert torch.equal(cond(x, t), cond(x, t, torch.full((2,), 10)))
    assert not torch.equal(cond(x, t, torch.tensor([1, 2])), cond(x, t))


# -- evaluation labels -----------------------------------------------------------------------------


def test_labels_are_balanced_and_fixed_by_the_seed():
    a = make_labels(1000, 10, 7)
    assert torch.equal(a, make_labels(1000, 10, 7)) and not torch.equal(a, make_labels(1000, 10, 8))
    assert torch.bincount(a).tolist() == [100] * 10
    for n in (7, 23, 64, 500):  # any prefix (a batch, a pruning rung) is balanced to within one
        counts = torch.bincount(a[:n], minlength=10)
        assert counts.max() - counts.min() <= 1
    assert len(make_labels(5, 10, 0)) == 5 and a.dtype == torch.long
    assert not torch.equal(a[:10], torch.arange(10))  # an order drawn from the seed


def test_class_accuracy_per_class():
    class Oracle(nn.Module):
        def classify(self, x):  # the class is the image's mean pixel
            return torch.nn.functional.one_hot(x.mean(dim=(1, 2, 3)).round().long(), 3).float()

    labels = torch.tensor([0, 1, 1, 2, 2])
    images = torch.tensor([0.0, 1.0, 2.0, 2.0, 2.0]).view(5, 1, 1, 1).expand(5, 1, 2, 2)
    assert class_accuracy(Oracle(), images, labels, 3) == [1.0, 0.5, 1.0]
    assert math.isnan(class_accuracy(Oracle(), images[:1], labels[:1], 3)[2])


# -- the registered model's interface --------------------------------------------------------------


def test_generator_samples_a_class_or_the_evaluators_balanced_labels():
    from mlflow.exceptions import MlflowException

    spec = _spec(guidance=2.0)
    torch.manual_seed(0)
    gen = Generator(spec.build(), spec)
    from lcsc_ops.evaluation.fid import make_noise

    want = sample_in_batches(gen.sampler, gen.model, make_noise(12, (1, 8, 8), 3),
                             guidance_for(spec.conditioning, make_labels(12, 10, 3)), batch_size=64, device="cpu")
    assert torch.equal(gen.sample(12, seed=3), want)  # what the FID evaluator samples for seed 3
    threes = gen.sample(4, seed=3, label=3, guidance=4.0)
    assert torch.equal(threes, torch.from_numpy(gen.predict({"num_samples": 4, "seed": 3, "label": 3},
                                                            params={"guidance": 4.0})))
    assert not torch.equal(threes, gen.sample(4, seed=3, label=3))
    with pytest.raises(LcscError, match="label must be in 0..9"):
        gen.sample(2, label=10)
    with pytest.raises(LcscError, match="guidance"):
        gen.sample(2, guidance=-1.0)
    plain = Generator(DigitsUNet(channels=8), ModelSpec(factory=UNET, sampler={"name": "ddim", "steps": 2}))
    with pytest.raises(LcscError, match="unconditional"):
        plain.sample(2, label=3)
    with pytest.raises(MlflowException, match="unknown request field"):
        plain.predict({"num_samples": 2, "label": 3})
    sig = signature(spec.to_dict())
    assert [c.name for c in sig.inputs.inputs] == ["num_samples", "seed", "label"]
    assert sig.params.params[0].name == "guidance" and sig.params.params[0].default == 2.0
    assert [c.name for c in signature(plain.spec.to_dict()).inputs.inputs] == ["num_samples", "seed"]
    assert signature(plain.spec.to_dict()).params is None


def test_options_refuse_guidance_without_a_conditional_model(store, tiny_run):
    from lcsc_ops.pipeline.optimize import run_optimize
    from lcsc_ops.training import TrainConfig
    from tests.conftest import tiny_optimize_config

    with pytest.raises(LcscError, match="--guidance applies to class-conditional models"):
        run_optimize(tiny_optimize_config(tiny_run, store, guidance=2.0), log=lambda m: None)
    with pytest.raises(LcscError, match="--guidance"):
        run_optimize(tiny_optimize_config(tiny_run, store, guidance=-1.0), log=lambda m: None)
    result = runner.invoke(app, ["train", "--guidance", "2", "--steps", "1", "--tracking-uri", store["uri"]])
    assert result.exit_code == 1 and "apply to conditional models (--conditional)" in result.output
    assert TrainConfig(conditional=True).label_dropout == 0.1 and TrainConfig().guidance is None


# -- acceptance: train -> optimize -> register -> load by alias -> sample class 3 --------------------


def _invoke(args: list[str]) -> str:
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    return result.output


def test_conditional_train_optimize_register_load_and_sample_a_class(store, tmp_path):
    """The cheapest setting that passed on 2 cores, 4 training seeds: 200 steps of a 16-channel U-Net
    (~10 s), 4 DDIM steps; at guidance 3 the classifier labels 97-98% of class-3 samples 3."""
    uri = ["--tracking-uri", store["uri"]]
    run_id = _invoke(["train", "--conditional", "--guidance", "3", "--steps", "200", "--channels", "16",
                      "--batch-size", "64", "--lr", "3e-3", "--warmup-steps", "20", "--checkpoint-every", "50",
                      "--sampler-steps", "4", "--log-every", "50", "--experiment", "conditional",
                      "--model-name", "digits-cond", "--quiet", *uri]).strip().splitlines()[-1]
    report = tmp_path / "results.json"
    _invoke(["optimize", run_id, "--window", "4", "--n-trials", "3", "--search-samples", "100", "--final-samples",
             "100", "--final-seeds", "2", "--top-k", "2", "--ema-grid", "3", "--batch-size", "100", "--device", "cpu",
             "--guidance", "2", "--storage", store["storage"], "--report", str(report), "--quiet", *uri])
    results = json.loads(report.read_text())
    assert results["guidance"] == {"default": 3.0, "used": 2.0}
    for name, row in results["methods"].items():
        assert len(row["class_accuracy"]) == 10 and all(0 <= a <= 1 for a in row["class_accuracy"])
        assert (row["final_default_nfe_mean"] is not None) == (row["kind"] == "baseline")  # baselines at w 3 too
    client = mlflow.tracking.MlflowClient(store["uri"])
    assert {"class_acc_3.training_ema", f"class_acc.{results['winner']}"} <= set(
        client.get_run(results["parent_run_id"]).data.metrics)
    markdown = client.download_artifacts(results["parent_run_id"], "report/results.md", str(tmp_path))
    assert "### Class-conditional accuracy" in open(markdown).read()
    reg = results["registered_model"]
    _invoke(["promote", reg["name"], str(reg["version"]), "--alias", "champion", *uri])

    import lcsc_ops

    gen = lcsc_ops.load(f"models:/{reg['name']}@champion", tracking_uri=store["uri"])
    assert gen.spec.conditioning.guidance == 2.0  # the scale the search used
    classifier = build_extractor("digits-cnn")
    threes = gen.sample(64, seed=0, label=3, guidance=3.0)
    assert (classifier.classify(threes).argmax(1) == 3).float().mean() > 0.8
    unguided = gen.sample(64, seed=0, label=3, guidance=0.0)  # the null label: the class is not asked for
    assert (classifier.classify(unguided).argmax(1) == 3).float().mean() < 0.5
    mlflow.set_tracking_uri(store["uri"])
    served = mlflow.pyfunc.load_model(f"models:/{reg['name']}@champion").predict(
        {"num_samples": 8, "seed": 0, "label": 3}, params={"guidance": 3.0})
    assert torch.equal(torch.from_numpy(served), gen.sample(8, seed=0, label=3, guidance=3.0))
