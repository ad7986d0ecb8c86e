"""Trainer: a few steps of every objective on a tiny model lower the loss; checkpoint →
resume reproduces the uninterrupted run; export → zoo-style backbone; the CLI; unsafe checkpoints."""

import numpy as np
import pytest
import torch
from pretrain_helpers import toy_images, write_shards

from soapvit.backbones.vit import VisionTransformerBackbone, read_card
from soapvit.cli import main
from soapvit.pretrain import OBJECTIVES, TrainConfig, build_objective, export_backbone, train
from soapvit.schedule import learning_rate

TINY = {"image_size": 16, "patch_size": 4, "embed_dim": 32, "depth": 2, "num_heads": 2}
OPTIONS = {"dino": {"out_dim": 64, "local_crops": 2, "local_size": 8},
           "ibot": {"out_dim": 64, "local_crops": 2, "local_size": 8}}


@pytest.fixture(autouse=True)
def one_thread():
    """Single-threaded: on the shared 2-core machine two OpenMP threads spin-wait on each other."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.mark.parametrize("objective", OBJECTIVES)
def test_few_steps_lower_the_loss(objective, tmp_path):
    torch.manual_seed(0)
    images, labels = toy_images()
    config = TrainConfig(objective, epochs=8, batch_size=16, lr=3e-3, warmup_fraction=0.0, vit=TINY,
                         options=OPTIONS.get(objective, {}))
    result = train(config, images, labels, tmp_path / "c.pt")
    h = result.history
    assert result.finished and len(h) == 16
    assert np.mean(h[-4:]) < np.mean(h[:4]), h


@pytest.mark.parametrize("objective", OBJECTIVES)
def test_training_reaches_the_exported_final_norm(objective):
    """Probes and SOAP read final-norm tokens, so every objective must train that norm."""
    torch.manual_seed(0)
    images, labels = toy_images(8)
    config = TrainConfig(objective, vit=TINY, options=OPTIONS.get(objective, {}))
    model = build_objective(config, num_classes=4)
    model.loss(images, labels, torch.Generator().manual_seed(0)).backward()
    norm = model.encoder.norm  # the student, whose EMA is exported for self-distillation
    assert norm.weight.grad is not None and norm.weight.grad.abs().max() > 0
    assert norm.bias.grad is not None and norm.bias.grad.abs().max() > 0


@pytest.mark.parametrize("objective", ["semanticmim", "ibot", "supervised"])
def test_resume_reproduces_the_next_steps(objective, tmp_path):
    images, labels = toy_images()
    config = TrainConfig(objective, epochs=2, batch_size=8, vit=TINY, options=OPTIONS.get(objective, {}))
    torch.manual_seed(0)
    full = train(config, images, labels, tmp_path / "full.pt", max_steps=5)
    torch.manual_seed(0)
    first = train(config, images, labels, tmp_path / "part.pt", max_steps=3)
    torch.manual_seed(123)  # the global RNG must not matter after resume
    second = train(config, images, labels, tmp_path / "part.pt", resume=tmp_path / "part.pt", max_steps=2)
    assert first.step == 3 and second.step == 5 and second.total_steps == 8
    np.testing.assert_allclose(second.history, full.history, rtol=1e-6, atol=1e-7)


def test_export_writes_a_backbone_with_card(tmp_path):
    images, labels = toy_images()
    config = TrainConfig("semanticmim", epochs=0.5, batch_size=8, vit=TINY)
    train(config, images, labels, tmp_path / "c.pt")
    path = export_backbone(tmp_path / "c.pt", tmp_path / "m.safetensors", {"note": "test"})
    backbone = VisionTransformerBackbone.from_checkpoint(path)
    assert backbone.num_prefix_tokens == 8 and backbone.embed_dim == 32  # proxies kept, reconstruction dropped
    card = read_card(path)
    assert card["objective"] == "semanticmim" and card["steps"] == 2 and card["note"] == "test"
    feats = backbone.forward_features(torch.randn(1, 3, 16, 16), "all", attentions=[1])
    assert feats.tokens[1].shape == (1, 4, 4, 32) and feats.prefix[0].shape == (1, 8, 32)
    assert not any(k.startswith("reconstruction") for k in backbone.vit.state_dict())


def test_cli_pretrain_resume_and_export(tmp_path, capsys, run_cli):
    images, labels = toy_images()
    write_shards(tmp_path / "shards", images, labels)
    common = ["pretrain", "--objective", "maskfeat", "--data", str(tmp_path / "shards"), "--out", str(tmp_path / "c.pt"),
              "--image-size", "16", "--patch-size", "4", "--embed-dim", "16", "--depth", "2", "--num-heads", "2",
              "--batch-size", "8", "--epochs", "1"]
    with _no_exit():
        main(common + ["--max-steps", "2"])
    out = capsys.readouterr().out
    assert "step 2/4 paused" in out
    with _no_exit():
        main(common + ["--resume", str(tmp_path / "c.pt"), "--export", str(tmp_path / "m.safetensors")])
    out = capsys.readouterr().out
    assert "step 4/4 finished" in out and "m.safetensors" in out
    assert VisionTransformerBackbone.from_checkpoint(tmp_path / "m.safetensors").num_blocks == 2
    code, _, err = run_cli(["pretrain", "--objective", "simclr", "--data", str(tmp_path / "shards"),
                            "--out", str(tmp_path / "x.pt")])
    assert code == 2 and "--objective 'simclr'" in err and len(err.strip().splitlines()) == 1
    code, _, err = run_cli(common + ["--resume", str(tmp_path / "nope.pt")])
    assert code == 2 and "nope.pt" in err


class _no_exit:
    """A successful command may return or exit with status 0."""

    def __enter__(self):
        return self

    def __exit__(self, kind, value, tb):
        return kind is SystemExit and value.code in (0, None)


def test_trainer_follows_the_shared_schedule(tmp_path):
    images, labels = toy_images()
    config = TrainConfig("maskfeat", epochs=1, batch_size=8, lr=1e-3, min_lr=1e-5, warmup_fraction=0.5, vit=TINY)
    rates = []
    train(config, images, labels, tmp_path / "c.pt", log=lambda state: rates.append(state.lr))
    expect = [learning_rate(step / 4, 1.0, 0.5, 1e-3, 1e-5) for step in range(1, 5)]
    assert rates == pytest.approx(expect) and rates[1] == pytest.approx(1e-3) and rates[-1] == pytest.approx(1e-5)


class _WritesMarker:
    """Unpickling this object would create a file (as a malicious checkpoint could run a command)."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return open, (self.marker, "w")


def test_crafted_checkpoint_is_refused_without_running_code(tmp_path, run_cli):
    images, labels = toy_images()
    write_shards(tmp_path / "shards", images, labels)
    marker, crafted = tmp_path / "marker", tmp_path / "crafted.ckpt"
    torch.save({"train_config": {"objective": "mae"}, "payload": _WritesMarker(marker)}, crafted)
    code, _, err = run_cli(["pretrain", "--objective", "mae", "--data", str(tmp_path / "shards"),
                            "--out", str(tmp_path / "c.pt"), "--resume", str(crafted)])
    assert not marker.exists()
    assert code == 2 and len(err.strip().splitlines()) == 1 and "crafted.ckpt" in err


def test_cpu_budget_ends_the_run(tmp_path):
    images, labels = toy_images()
    config = TrainConfig("maskfeat", epochs=1000, batch_size=8, vit=TINY, cpu_budget_s=0.5)
    result = train(config, images, labels, tmp_path / "c.pt")
    assert result.finished and result.cpu_s >= 0.5 and 0 < result.step < result.total_steps
