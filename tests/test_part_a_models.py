"""Part-A models: hand-computed values for ExamNet, exam_function, BatchNorm, GAN pieces, slow objective.

These tests need no training loop (fast). Training-based properties are in test_part_a_tasks.py.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch.nn import functional as F

from fedsim.models.part_a import (
    GAN,
    SLOW_CURVATURE,
    BNConvNet,
    DualHeadViT,
    ExamNet,
    LinearAutoencoder,
    exam_function,
    exam_function_grad,
    ring_centres,
    ring_mode_coverage,
    sample_ring,
    slow_objective,
)
from fedsim.reports.part_a import compare_slow_objective, exam_net_step, part_a_report


@pytest.fixture(autouse=True)
def _one_thread() -> None:
    torch.set_num_threads(1)


def test_public_names_import() -> None:
    from fedsim.models.part_a import (  # noqa: F401
        GAN,
        BNConvNet,
        DualHeadViT,
        ExamNet,
        LinearAutoencoder,
        exam_function,
    )


# ---- ExamNet -------------------------------------------------------------------------------------
def test_exam_net_one_sgd_step_matches_the_exam() -> None:
    # Prepare: the exam's network (all weights 1, g(x) = x/4, no biases), x = [1, 0, 1, 1] = target.
    model = ExamNet().double()
    assert model.hidden.bias is None and model.output.bias is None
    x = torch.tensor([1.0, 0.0, 1.0, 1.0], dtype=torch.float64)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    # Execute: forward, sum of squared errors, one SGD step.
    y = model(x)
    loss = ((y - x) ** 2).sum()
    loss.backward()
    optimizer.step()
    # Assert (hand-computed): W1 x = [3, 3], h = [3/4, 3/4], y = W2 h = 1.5 everywhere,
    # loss = 0.25 + 2.25 + 0.25 + 0.25 = 3; dL/dy = [1, 3, 1, 1];
    # dL/dW2 = dL/dy h^T -> W2 rows 1 - 0.5 * 0.75 * [1, 3, 1, 1];
    # dL/dh = W2^T dL/dy = [6, 6], through g: 6/4 = 1.5 -> dL/dW1 = 1.5 x^T -> W1 rows 1 - 0.75 x.
    assert y.tolist() == [1.5, 1.5, 1.5, 1.5]
    assert float(loss.detach()) == 3.0
    assert model.hidden.weight.tolist() == [[0.25, 1.0, 0.25, 0.25]] * 2
    assert model.output.weight.tolist() == [[0.625, 0.625], [-0.125, -0.125], [0.625, 0.625], [0.625, 0.625]]


def test_exam_net_runs_its_children_in_order_and_init_is_configurable() -> None:
    model = ExamNet(init_value=None)
    assert [n for n, _ in model.named_children()] == ["hidden", "act", "output"]
    assert not torch.all(model.hidden.weight == model.hidden.weight[0, 0])  # random init
    x = torch.randn(5, 4)
    by_hand = model.output.weight @ (model.hidden.weight @ x.T / 4)
    torch.testing.assert_close(model(x), by_hand.T)
    assert torch.all(ExamNet(init_value=0.3).output.weight == 0.3)


def test_report_step_agrees_with_the_exam() -> None:
    step = exam_net_step()
    assert step.loss == 3.0
    assert step.grad_output_layer.tolist() == [[0.75, 0.75], [2.25, 2.25], [0.75, 0.75], [0.75, 0.75]]
    assert step.grad_hidden_layer.tolist() == [[1.5, 0.0, 1.5, 1.5]] * 2
    assert step.new_output_weight[1].tolist() == [-0.125, -0.125]


# ---- exam_function ---------------------------------------------------------------------------------
def test_exam_function_autograd_matches_the_hand_derivative() -> None:
    x = torch.linspace(-3.0, 3.0, 601, dtype=torch.float64)
    by_hand = 2 * x * (1 + torch.sin(math.pi * x)) + math.pi * x**2 * torch.cos(math.pi * x)
    torch.testing.assert_close(exam_function_grad(x), by_hand, atol=1e-12, rtol=0)


def test_exam_function_values_at_the_exam_points() -> None:
    x = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0], dtype=torch.float64)
    # f: 0; 1/4 * 2; 1 * 1; 9/4 * 0; 4 * 1.  f': 0; 2*1/2*2 + 0; 2*1 - pi; 0; 2*2*1 + pi*4*1.
    torch.testing.assert_close(exam_function(x), torch.tensor([0.0, 0.5, 1.0, 0.0, 4.0], dtype=torch.float64),
                               atol=1e-12, rtol=0)
    torch.testing.assert_close(
        exam_function_grad(x), torch.tensor([0.0, 2.0, 2 - math.pi, 0.0, 4 + 4 * math.pi], dtype=torch.float64),
        atol=1e-12, rtol=0)


@pytest.mark.parametrize("n", [-2, -1, 0, 1, 2, 3])
def test_exam_function_derivative_vanishes_at_2n_minus_half(n: int) -> None:
    x = torch.tensor([2 * n - 0.5], dtype=torch.float64)
    assert abs(float(exam_function_grad(x))) < 1e-9
    assert abs(float(exam_function(x))) < 1e-12  # they are the zeros (global minima) of f >= 0
    assert float(exam_function_grad(torch.tensor([0.0]))) == 0.0


def test_zeros_of_f_are_exactly_0_and_2n_minus_half() -> None:
    # On a fine grid f >= 0, and f is near 0 only near 0 and 2n - 1/2 (n = -1, 0, 1, 2 in [-3, 3]).
    x = torch.linspace(-3.0, 3.0, 60001, dtype=torch.float64)
    f = exam_function(x)
    assert float(f.min()) >= 0.0
    near_zero = x[f < 1e-6]
    roots = torch.tensor([-2.5, -0.5, 0.0, 1.5], dtype=torch.float64)
    assert float(torch.cdist(near_zero[:, None], roots[:, None]).min(dim=1).values.max()) < 2e-3


# ---- LinearAutoencoder ---------------------------------------------------------------------------------
def test_linear_autoencoder_is_linear_with_no_activation() -> None:
    model = LinearAutoencoder(64, 8)
    assert [n for n, _ in model.named_children()] == ["encoder", "decoder"]
    a, b = torch.randn(3, 64), torch.randn(3, 64)
    torch.testing.assert_close(model(2 * a - 3 * b), 2 * model(a) - 3 * model(b), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(model(a), a @ (model.decoder.weight @ model.encoder.weight).T)
    q = model.subspace()
    torch.testing.assert_close(q.T @ q, torch.eye(8, dtype=torch.float64), atol=1e-10, rtol=0)


# ---- BNConvNet ---------------------------------------------------------------------------------------
def test_bn_conv_net_shape_size_and_no_conv_bias() -> None:
    model = BNConvNet()
    params = sum(p.numel() for p in model.parameters())
    assert 20_000 <= params <= 30_000, params
    assert [n for n, _ in model.named_children()] == ["block1", "block2", "block3", "block4", "head"]
    convs = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    assert len(convs) == 4 and all(c.bias is None for c in convs)
    assert model(torch.randn(7, 1, 8, 8)).shape == (7, 10)


def test_conv_bias_before_batchnorm_leaves_training_outputs_unchanged() -> None:
    # Prepare: the same weights, once without and once with (random, large) conv biases.
    torch.manual_seed(0)
    plain = BNConvNet()
    biased = BNConvNet(conv_bias=True)
    missing, unexpected = biased.load_state_dict(plain.state_dict(), strict=False)
    assert sorted(missing) == [f"block{i}.conv.bias" for i in range(1, 5)] and not unexpected
    with torch.no_grad():
        for i in range(1, 5):
            getattr(biased, f"block{i}").conv.bias.normal_(0.0, 3.0)
    x = torch.randn(64, 1, 8, 8)
    # Execute: training mode (BatchNorm normalises with the batch's own mean).
    plain.train()
    biased.train()
    out_plain, out_biased = plain(x), biased(x)
    # Assert: the per-channel bias is subtracted again with the batch mean.
    assert float((out_plain - out_biased).detach().abs().max()) < 1e-5
    # ...whereas in eval mode (running statistics, updated only once) the bias does show.
    plain.eval()
    biased.eval()
    with torch.no_grad():
        assert float((plain(x) - biased(x)).abs().max()) > 1e-3


# ---- GAN -------------------------------------------------------------------------------------------
def test_gan_discriminator_is_logistic_regression_on_features_and_losses_are_bce() -> None:
    torch.manual_seed(0)
    gan = GAN(2, latent_dim=4, hidden=16)
    assert isinstance(gan.discriminator.classifier, torch.nn.Linear)
    assert gan.discriminator.classifier.out_features == 1
    real = torch.randn(10, 2)
    fake = gan(gan.noise(10))
    feats = gan.discriminator.features(real)
    p_real = torch.sigmoid(feats @ gan.discriminator.classifier.weight.T + gan.discriminator.classifier.bias)
    torch.testing.assert_close(torch.sigmoid(gan.discriminator(real)), p_real.squeeze(1))
    p_fake = torch.sigmoid(gan.discriminator(fake))
    expected_d = -torch.log(p_real.squeeze(1)).mean() - torch.log(1 - p_fake).mean()
    torch.testing.assert_close(gan.discriminator_loss(real, fake), expected_d)
    # Non-saturating generator loss: -log D(G(z)), not log(1 - D(G(z))).
    torch.testing.assert_close(gan.generator_loss(fake), -torch.log(p_fake).mean())
    assert F.binary_cross_entropy(p_fake, torch.ones_like(p_fake)).item() == pytest.approx(
        gan.generator_loss(fake).item(), rel=1e-5)


def test_ring_sampler_and_coverage_metric() -> None:
    centres = ring_centres(8, 2.0)
    torch.testing.assert_close(centres.norm(dim=1), torch.full((8,), 2.0, dtype=torch.float64))
    x, mode = sample_ring(8000, sigma=0.05, generator=torch.Generator().manual_seed(0))
    covered, fraction = ring_mode_coverage(x, sigma=0.05)
    assert covered == 8
    # Within 3 sigma of a 2-D Gaussian: 1 - exp(-9/2) = 98.9% of its samples; each mode has 1/8.
    torch.testing.assert_close(fraction.sum().item(), 1 - math.exp(-4.5), atol=0.005, rtol=0)
    collapsed = torch.cat([x[mode == 3], x[mode == 5][:3]])  # one mode, plus 3 stray samples (< 2%)
    assert ring_mode_coverage(collapsed, sigma=0.05)[0] == 1


# ---- DualHeadViT --------------------------------------------------------------------------------------
def test_dual_head_vit_outputs_one_tensor_from_children_in_order() -> None:
    torch.manual_seed(0)
    model = DualHeadViT(n_classes=10, n_labels=4).eval()
    names = [n for n, _ in model.named_children()]
    assert names == ["patch_embed", "tokens", "block0", "block1", "block2", "block3", "head"]
    x = torch.randn(5, 1, 8, 8)
    out = model(x)
    assert out.shape == (5, 14)
    h = x
    for child in model.children():
        h = child(h)
    torch.testing.assert_close(out, h)
    class_logits, label_logits = model.split(out)
    assert class_logits.shape == (5, 10) and label_logits.shape == (5, 4)
    assert model.patch_embed(x).shape == (5, 16, 32)  # 8x8 image, 2x2 patches -> 16 tokens


# ---- slow objective ---------------------------------------------------------------------------------
def test_slow_objective_gradient_descent_is_much_slower_than_adagrad() -> None:
    gd, ada = compare_slow_objective(tol=1e-6, max_iter=20000)
    assert ada.iterations is not None and gd.iterations is not None
    # GD at lr = 1/L shrinks the flat coordinate by (1 - b/a) per step: ln(1.5 / w*) / -ln(0.999)
    # with f = b w^2 / 2 < 1e-6 -> w* = sqrt(2e-6 / b); i.e. about 5.8k iterations.
    a, b = SLOW_CURVATURE
    expected = math.ceil(math.log(1.5 / math.sqrt(2e-6 / b)) / -math.log(1 - b / a))
    assert abs(gd.iterations - expected) <= 1
    assert gd.iterations > 50 * ada.iterations
    assert float(slow_objective(gd.path[-1])) < 1e-6 and float(slow_objective(ada.path[-1])) < 1e-6


def test_part_a_report_prints_the_worked_examples(tmp_path) -> None:
    text = part_a_report(tmp_path)
    assert "AB = [[1, 0], [0, 1]]   (= I: True)" in text
    assert "[1.5, 1.5, 1.5, 1.5]" in text
    assert "[[0.625, 0.625], [-0.125, -0.125], [0.625, 0.625], [0.625, 0.625]]" in text
    assert "[[0.25, 1, 0.25, 0.25], [0.25, 1, 0.25, 0.25]]" in text
    assert "-1.14159" in text  # f'(1) = 2 - pi
    png = tmp_path / "slow_objective.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_models_are_deterministic_under_a_seed() -> None:
    torch.manual_seed(3)
    a = BNConvNet()
    torch.manual_seed(3)
    b = copy.deepcopy(BNConvNet())
    for (na, pa), (nb, pb) in zip(a.state_dict().items(), b.state_dict().items(), strict=True):
        assert na == nb and torch.equal(pa, pb)
