"""The context-head measurement on the built-in model (scripts/context_head_experiment.py)."""

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))

import context_head_experiment as X  # noqa: E402
from napari_bci.models.level_aware import load_builtin  # noqa: E402
from napari_bci.train.loop import synthetic_pairs  # noqa: E402


@pytest.fixture(scope="module")
def model():
    return load_builtin(device="cpu").module.eval()


@pytest.fixture(scope="module")
def images():
    out = []
    for p in synthetic_pairs(8, 256, seed=424242):
        he, _, _ = p.load()
        out.append((X.to_tensor(he), p.level))
    return out


def test_window_features_are_the_encoder_statistics_of_the_window(model, images):
    """A window that covers the whole 256 px image (16 x 16 cells): the centre cell's features are
    the mean of every encoder stage, the SD of the strided ones and the mean dense logits."""
    x = images[0][0]
    with torch.no_grad():
        ((s0, s1, s2, z), dense), cells = X.encode(model, x)
        f = X.window_features(cells, model, 17)[0, :, 8, 8]
    means = torch.cat([t.mean((2, 3))[0] for t in (s0, s1, s2, z)])
    sds = torch.cat([t.std((2, 3), correction=0)[0] for t in (s1, s2, z)])
    want = torch.cat([means, sds, dense.float().mean((2, 3))[0]])
    assert f.shape == want.shape == (352,)
    np.testing.assert_allclose(f.numpy(), want.numpy(), rtol=1e-3, atol=1e-4)


def test_context_head_gives_a_level_map_and_learns_its_training_levels(model, images):
    torch.manual_seed(0)
    head = X.ContextHead(model, 8)
    with torch.no_grad():
        acc = head.fit([x for x, _ in images], [lv for _, lv in images], l2=0.01)
        _, cells = X.encode(model, images[1][0])
        logits = head.logits(cells)
    assert acc > 0.9  # 352 features, 8 images: it can fit them; the measurement is on held-out pairs
    assert logits.shape == (1, 4, 16, 16)
    assert int(logits.mean((2, 3)).argmax()) == images[1][1]


def test_encode_then_decode_under_the_models_own_map_is_its_forward_pass(model, images):
    """The split the script uses (encoder, then decoder under a chosen level map) is the model's own."""
    x = images[2][0]
    with torch.no_grad():
        skips, dense = model.encode(x)
        mine = model.decode(skips, model.condition(dense))
        ref, ref_dense = model.forward_dense(x)
    torch.testing.assert_close(dense, ref_dense)
    torch.testing.assert_close(mine, ref)


def test_decoder_fine_tune_with_the_cell_reading_moves_only_the_decoder():
    """``--finetune`` with ``--cell``: the crops' ring keys follow their crops, the decoder learns and
    the encoder and heads keep their weights."""
    m = load_builtin(device="cpu").module.eval()
    images, targets, levels, rings = [], [], [], []
    for p in synthetic_pairs(2, 256, seed=424246, levels=("2+", "3+")):
        he, ihc, _ = p.load()
        images.append(X.to_tensor(he))
        targets.append(X.to_tensor(ihc))
        levels.append(p.level)
        rings.append(X.CellReadingLoss.rings(ihc))
    before = {n: p.detach().clone() for n, p in m.named_parameters()}
    X.finetune_decoder(m, images, targets, levels, 2, 0.0, rings, (40.0, 4.0, 20.0), 0.0)
    moved = {n.split(".")[0] for n, p in m.named_parameters() if not torch.equal(p, before[n])}
    assert moved and moved <= {"blocks", "up2", "up1", "up0", "out"}
