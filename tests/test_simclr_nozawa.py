"""simclr_debiased.py's flags for Nozawa & Sato's runs: --head nozawa and --num_chunks (one device
standing in for several GPUs that each compute their own loss on a local batch K+1)."""
import pytest
import torch

import common
import simclr_debiased

TINY = ["--dataset", "folder", "--arch", "resnet18", "--width", "4", "--hidden_dim", "32", "--feature_dim", "16",
        "--workers", "0", "--eval_every", "0"]
NOZAWA = ["--estimator", "easy", "--head", "nozawa", "--stem_padding", "3", "--norm", "none", "--blur_p", "0",
          "--optimizer", "larc", "--weight_decay", "1e-4", "--warmup_epochs", "0.5", "--schedule", "cosine",
          "--negatives", "local"]


def args_for(**overrides):
    args = {"arch": "resnet18", "stem": "cifar", "width": 4, "hidden_dim": 32, "feature_dim": 16}
    args.update(overrides)
    return args


def test_nozawa_head_structure_and_default_head_unchanged():
    head = simclr_debiased.build_model(args_for(head="nozawa")).projector
    assert [name for name, _ in head.named_children()] == ["linear1", "bn1", "relu1", "linear2"]
    assert head.linear1.bias is not None and head.linear2.bias is None
    assert isinstance(head.bn1, torch.nn.BatchNorm1d) and head.linear2.out_features == 16
    # a checkpoint from before the flag (no "head" in its args) rebuilds the DCL/HCL head
    old = simclr_debiased.build_model(args_for()).projector
    assert old[0].bias is None and old[3].bias is not None and isinstance(old[1], torch.nn.BatchNorm1d)
    assert set(old.state_dict()) == set(simclr_debiased.build_model(args_for(head="simclr")).projector.state_dict())
    with pytest.raises(ValueError, match="unknown head"):
        simclr_debiased.SimCLR("resnet18", "cifar", 4, 32, 16, head="mlp")


def test_weight_decay_skips_the_nozawa_head_bias_and_bn():
    model = simclr_debiased.build_model(args_for(head="nozawa"))
    args = simclr_debiased.build_parser().parse_args(["--optimizer", "larc", "--weight_decay", "1e-4"])
    decay, no_decay = simclr_debiased.build_optimizer(model, args).param_groups
    ids = {id(p) for p in no_decay["params"]}
    named = dict(model.named_parameters())
    for name in ("projector.linear1.bias", "projector.bn1.weight", "projector.bn1.bias", "backbone.bn1.weight"):
        assert id(named[name]) in ids, name
    for name in ("projector.linear1.weight", "projector.linear2.weight", "backbone.conv1.weight",
                 "backbone.layer2.0.downsample.1.weight"):  # their filter misses downsample BNs, reproduced
        assert id(named[name]) not in ids, name
    assert decay["larc_weight_decay"] == 1e-4 and no_decay["larc_weight_decay"] == 0.0


def test_chunked_loss_is_the_mean_of_independent_chunk_losses():
    g = torch.Generator().manual_seed(0)
    z1, z2 = torch.randn(2, 12, 8, generator=g, dtype=torch.float64, requires_grad=True)
    for estimator, tau_plus, beta in (("easy", 0.0, 0.0), ("hard", 0.1, 1.0)):
        terms, clamped = simclr_debiased.chunked_loss_terms(z1, z2, 3, 0.5, tau_plus, beta, estimator)
        per_chunk = [simclr_debiased.contrastive_loss(a, b, 0.5, tau_plus, beta, estimator, gather=False)
                     for a, b in zip(z1.chunk(3), z2.chunk(3))]
        assert terms.shape == (24,) and clamped.shape == (24,)
        assert float(terms.mean().detach()) == pytest.approx(float(sum(per_chunk).detach() / 3), rel=1e-12)
        whole = simclr_debiased.contrastive_loss(z1, z2, 0.5, tau_plus, beta, estimator, gather=False)
        assert abs(float(terms.mean().detach()) - float(whole.detach())) > 1e-3  # fewer negatives: a different loss
    # gradients: each chunk's rows only feel their own chunk
    loss = simclr_debiased.chunked_loss_terms(z1, z2, 3, 0.5, estimator="easy")[0].mean()
    grad = torch.autograd.grad(loss, z1)[0]
    alone = torch.autograd.grad(simclr_debiased.contrastive_loss(z1[:4], z2[:4], 0.5, estimator="easy",
                                                                 gather=False) / 3, z1)[0]
    torch.testing.assert_close(grad[:4], alone[:4])
    assert simclr_debiased.chunked_loss_terms(z1, z2, 1, 0.5, estimator="easy")[0].shape == (24,)
    with pytest.raises(ValueError, match="does not split"):
        simclr_debiased.chunked_loss_terms(z1, z2, 5)


def test_nozawa_run_trains_saves_and_rebuilds(tmp_path, cifar_dir):
    out = tmp_path / "k16"
    simclr_debiased.main([*TINY, *NOZAWA, "--data_dir", cifar_dir, "--subset", "32", "--epochs", "1",
                          "--batch_size", "32", "--num_chunks", "2", "--lr", "0.0625", "--out_dir", str(out)])
    ckpt = torch.load(out / "last.pt", weights_only=True)
    assert ckpt["args"]["head"] == "nozawa" and ckpt["args"]["num_chunks"] == 2 and ckpt["epoch"] == 1
    model = common.model_from_checkpoint(ckpt)
    assert model.projector.linear2.bias is None and model.backbone.conv1.padding == (3, 3)
    assert torch.isfinite(model.projector(model.backbone(torch.rand(2, 3, 32, 32)))).all()


def run_main(argv, capsys):
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        simclr_debiased.main(argv)
    return exit_info.value.code, capsys.readouterr().err


@pytest.mark.parametrize("flags,fragment", [
    (["--num_chunks", "2"], "add --negatives local"),
    (["--num_chunks", "0", "--negatives", "local"], "--num_chunks must be >= 1"),
    (["--num_chunks", "3", "--negatives", "local"], "do not split into --num_chunks 3"),
    (["--num_chunks", "16", "--negatives", "local"], "chunks of at least 2"),
    (["--head", "mlp"], "invalid choice"),
])
def test_bad_chunk_and_head_flags_exit_2(flags, fragment, cifar_dir, capsys, tmp_path):
    code, err = run_main([*TINY, "--data_dir", cifar_dir, "--subset", "64", "--epochs", "1", "--batch_size", "16",
                          *flags, "--out_dir", str(tmp_path)], capsys)
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2 and "Traceback" not in err, err
    assert lines[-1].startswith("simclr_debiased.py: error: ") and fragment in lines[-1], err
