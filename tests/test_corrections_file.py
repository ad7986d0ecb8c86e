"""The corrections file: a SOAP head file of format 1 still loads (with posmean derived from its
decomposition), unknown variants and foreign files are one-line errors, and the one backbone check
refuses branch-feature fits and other backbones."""

import json

import pytest
import torch
from conftest import ToyBackbone
from eval_helpers import make_head
from safetensors.torch import save_file

from soapvit.corrections import CorrectionSet, check_backbone
from soapvit.corrections.posmean import PositionMean
from soapvit.errors import SoapvitError


def write_v1_head(path, head):
    """A head file as the first format wrote it: SOAP tensors, apply_block and blocks at the top."""
    tensors = {k: v.contiguous() for k, v in head.state().items()}
    save_file(tensors, str(path), metadata={"format": "soapvit-head/1", "apply_block": str(head.apply_block),
                                            "blocks": json.dumps(sorted(head.blocks)),
                                            "metadata": json.dumps(head.metadata)})
    return path


def test_a_format_1_head_loads_with_posmean_from_its_decomposition(tmp_path):
    head = make_head(torch.diag(torch.tensor([1.0, 0.0, 1.0, 1.0])), apply_block=1)
    d = head.blocks[1]
    d.position_mean = torch.arange(2 * 2 * 4, dtype=torch.float64).reshape(2, 2, 4)
    d.mean = torch.tensor([1.0, 2.0, 3.0, 4.0], dtype=torch.float64)
    d.p_real = d.q_synthetic = torch.zeros(2, 2, 4, dtype=torch.float64)
    loaded = CorrectionSet.load(write_v1_head(tmp_path / "v1.safetensors", head))
    assert list(loaded) == ["soap", "posmean"]
    torch.testing.assert_close(loaded.soap.projector, head.projector)
    tokens = torch.randn(3, 2, 2, 4)
    torch.testing.assert_close(loaded["posmean"].transform(tokens), tokens - (d.position_mean - d.mean).float())


def test_select_names_unknown_variants_and_foreign_files_are_refused(tmp_path):
    corrections = CorrectionSet({"soap": make_head(torch.eye(4))}, {"backbone": "toy:colour"})
    path = corrections.save(tmp_path / "c.safetensors")
    with pytest.raises(SoapvitError, match="--variants: registers not in the file"):
        CorrectionSet.load(path).select(["soap", "registers"])
    save_file({"x": torch.zeros(1)}, str(tmp_path / "other.safetensors"), metadata={"format": "something"})
    with pytest.raises(SoapvitError, match="not a soapvit corrections file"):
        CorrectionSet.load(tmp_path / "other.safetensors")


def test_the_backbone_check_refuses_branch_fits_other_models_and_widths():
    backbone = ToyBackbone(dim=16)
    posmean = PositionMean().fit_offset(torch.zeros(4, 4, 16), torch.zeros(16), 1)
    check_backbone({"backbone": "toy:test"}, [posmean], backbone)
    with pytest.raises(SoapvitError, match="block-features branch"):
        check_backbone({"backbone": "toy:test", "block_features": "branch"}, [posmean], backbone, allow_other=True)
    with pytest.raises(SoapvitError, match="fitted for toy:other, not toy:test"):
        check_backbone({"backbone": "toy:other"}, [posmean], backbone)
    check_backbone({"backbone": "toy:other"}, [posmean], backbone, allow_other=True)
    narrow = PositionMean().fit_offset(torch.zeros(4, 4, 8), torch.zeros(8), 1)
    with pytest.raises(SoapvitError, match="dimension 8"):
        check_backbone({"backbone": "toy:test"}, [narrow], backbone, allow_other=True)
    with pytest.raises(SoapvitError, match="other weights"):
        check_backbone({"backbone": "toy:test", "weights_digest": "0" * 16}, [posmean], backbone)


def test_an_earlier_block_correction_fitted_on_final_norm_tokens_is_warned_about():
    """Only a correction that edits the residual stream inside the pass (an earlier block) of a
    fit whose tokens all took the final norm (files of earlier versions, ``--final-norm all``)."""
    import warnings

    backbone = ToyBackbone(dim=16)  # blocks 0 and 1
    earlier = PositionMean().fit_offset(torch.zeros(4, 4, 16), torch.zeros(16), 0)
    last = PositionMean().fit_offset(torch.zeros(4, 4, 16), torch.zeros(16), 1)
    with pytest.warns(UserWarning, match="at block 0 was fitted on final-norm tokens"):
        check_backbone({"backbone": "toy:test", "norm": True}, [earlier, last], backbone)
    with pytest.warns(UserWarning, match="at block 0 was fitted on final-norm tokens"):
        check_backbone({"backbone": "toy:test"}, [earlier], backbone)  # no record: an older file
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        check_backbone({"backbone": "toy:test", "norm": "last"}, [earlier, last], backbone)
        check_backbone({"backbone": "toy:test", "norm": True}, [last], backbone)
