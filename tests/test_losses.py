"""Tests of the BE filter and losses: exactness against an independent scipy computation, agreement
of the two implementations (border included), gradients, MONAI conventions and bad input."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from monai.losses import DiceLoss
from scipy import ndimage

from beseg import BoundaryEnhancementLoss, DiceBELoss, log_filter
from beseg.losses import LoGFilter

IMPLS = ("fast", "reference")


def scipy_log(x: np.ndarray, passes: int, padding: str) -> np.ndarray:
    """The paper's filter on one (H, W[, D]) volume with scipy.ndimage, in float64."""
    out = x.astype(np.float64)
    for _ in range(passes):
        out = ndimage.uniform_filter(out, size=3, mode="constant", cval=0.0)
    out = ndimage.laplace(out, mode="constant", cval=0.0)
    if padding == "valid":
        m = passes + 1
        out = out[tuple(slice(m, s - m) for s in out.shape)]
    return out


def scipy_be(pred: np.ndarray, label: np.ndarray, passes: int, padding: str) -> np.ndarray:
    """Per-(batch, channel) mean of (F(P) - F(Y))^2, shape (B, C)."""
    b, c = pred.shape[:2]
    out = np.empty((b, c))
    for i in range(b):
        for j in range(c):
            d = scipy_log(pred[i, j], passes, padding) - scipy_log(label[i, j], passes, padding)
            out[i, j] = np.mean(d**2)
    return out


def sample(shape, dtype=torch.float32, seed=0):
    """Smooth-ish probabilities and a blob label, both non-zero up to the border."""
    gen = torch.Generator().manual_seed(seed)
    pred = torch.rand(shape, generator=gen, dtype=torch.float64)
    grids = torch.meshgrid(*[torch.linspace(-1, 1, s, dtype=torch.float64) for s in shape[2:]], indexing="ij")
    radius = sum(g**2 for g in grids).sqrt()
    label = (radius < 0.8).to(torch.float64).expand(shape).clone()
    return pred.to(dtype), label.to(dtype)


SHAPES = [(2, 1, 9, 10, 11), (1, 3, 12, 12, 12), (2, 2, 11, 13)]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("passes,padding", [(3, "same"), (1, "valid"), (0, "same"), (2, "valid")])
@pytest.mark.parametrize("impl", IMPLS)
def test_filter_matches_scipy(shape, passes, padding, impl):
    x, _ = sample(shape, torch.float64)
    got = log_filter(x, passes, padding, impl).numpy()
    for i in range(shape[0]):
        for j in range(shape[1]):
            np.testing.assert_allclose(got[i, j], scipy_log(x[i, j].numpy(), passes, padding), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("passes,padding", [(3, "same"), (1, "valid"), (3, "valid")])
@pytest.mark.parametrize("impl", IMPLS)
def test_loss_matches_scipy(shape, passes, padding, impl):
    pred, label = sample(shape, torch.float64)
    loss = BoundaryEnhancementLoss(include_background=True, smoothing_passes=passes, padding=padding, impl=impl, reduction="none")
    expected = scipy_be(pred.numpy(), label.numpy(), passes, padding)
    np.testing.assert_allclose(loss(pred, label).numpy(), expected, rtol=1e-10)
    # and in float32, to the precision float32 allows
    loss32 = loss(pred.float(), label.float()).numpy()
    np.testing.assert_allclose(loss32, expected, rtol=1e-5)


@pytest.mark.parametrize("dtype,rtol", [(torch.float32, 1e-5), (torch.float64, 1e-10)])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("passes,padding", [(3, "same"), (1, "valid"), (3, "valid")])
def test_fast_and_reference_agree(dtype, rtol, shape, passes, padding):
    values, grads = [], []
    for impl in IMPLS:
        pred, label = sample(shape, dtype)
        pred.requires_grad_(True)
        loss = BoundaryEnhancementLoss(include_background=True, smoothing_passes=passes, padding=padding, impl=impl)
        value = loss(pred, label)
        value.backward()
        values.append(value.detach())
        grads.append(pred.grad)
    torch.testing.assert_close(values[0], values[1], rtol=rtol, atol=0)
    # Gradients agree everywhere, the border voxels included, relative to their scale.
    scale = grads[1].abs().max()
    torch.testing.assert_close(grads[0], grads[1], rtol=rtol, atol=rtol * scale)
    border = torch.ones_like(grads[0], dtype=torch.bool)
    border[(slice(None), slice(None)) + (slice(1, -1),) * (len(shape) - 2)] = False
    assert grads[0][border].abs().max() > 0.01 * scale  # the border is really exercised


@pytest.mark.parametrize("impl", IMPLS)
def test_filter_agreement_float32(impl):
    pred, label = sample((2, 2, 16, 16, 16), torch.float32)
    for x in (pred, label):
        ref = log_filter(x.double(), impl="reference")
        torch.testing.assert_close(log_filter(x, impl=impl).double(), ref, rtol=1e-5, atol=1e-5 * ref.abs().max().item())


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("shape", [(1, 1, 12, 12, 12), (2, 2, 10, 9)])
def test_perfect_prediction_has_zero_loss_and_gradient(impl, shape):
    _, label = sample(shape)
    pred = label.clone().requires_grad_(True)
    loss = BoundaryEnhancementLoss(include_background=True, impl=impl)(pred, label)
    loss.backward()
    assert loss.item() == 0.0
    assert pred.grad.abs().max().item() == 0.0


@pytest.mark.parametrize("impl", IMPLS)
def test_constant_regions_filter_to_zero_far_from_boundary(impl):
    mask = torch.zeros(1, 1, 32, 32, 32)
    mask[..., 8:24, 8:24, 8:24] = 1.0
    out = log_filter(mask, smoothing_passes=3, impl=impl)[0, 0]
    # With 3 box passes and a Laplacian, a voxel sees 4 voxels each way: farther is constant.
    dist_in = ndimage.distance_transform_cdt(mask[0, 0].numpy(), metric="chessboard")
    dist_out = ndimage.distance_transform_cdt(1 - mask[0, 0].numpy(), metric="chessboard")
    far = torch.from_numpy((dist_in > 4) | (dist_out > 4))
    assert out[far].abs().max().item() < 1e-6
    profile = out[16, 16]  # a line through the cube's centre, across two faces
    assert profile[7].item() > 1e-2 and profile[8].item() < -1e-2  # outside/inside the face
    assert profile[23].item() < -1e-2 and profile[24].item() > 1e-2


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("passes,padding", [(3, "same"), (1, "valid"), (0, "same")])
@pytest.mark.parametrize("shape", [(2, 1, 6, 7, 6), (1, 2, 7, 8)])
def test_gradcheck(impl, passes, padding, shape):
    pred, label = sample(shape, torch.float64)
    pred.requires_grad_(True)
    label.requires_grad_(True)  # the gradient with respect to the label is checked too
    loss = BoundaryEnhancementLoss(include_background=True, smoothing_passes=passes, padding=padding, impl=impl, reduction="none")
    assert torch.autograd.gradcheck(loss, (pred, label), eps=1e-6, atol=1e-8)


@pytest.mark.parametrize("padding", ["same", "valid"])
def test_log_filter_gradcheck_and_double_backward(padding):
    x = torch.rand(1, 2, 6, 6, 6, dtype=torch.float64, requires_grad=True)
    fn = lambda t: log_filter(t, smoothing_passes=1, padding=padding)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (x,))
    assert torch.autograd.gradgradcheck(fn, (x,))


def test_fast_loss_retain_graph_gives_the_same_gradient_twice():
    pred, label = sample((1, 1, 8, 8, 8), torch.float64)
    pred.requires_grad_(True)
    loss = BoundaryEnhancementLoss(include_background=True)(pred, label)
    (g1,) = torch.autograd.grad(loss, pred, retain_graph=True)
    (g2,) = torch.autograd.grad(loss, pred)
    torch.testing.assert_close(g1, g2)


def _hessian_vector_products(impl, padding, spacing, pred, label, v_pred, v_label):
    """(H v) of the BE loss with respect to (prediction, target), by double backward."""
    p = pred.clone().requires_grad_(True)
    y = label.clone().requires_grad_(True)
    loss = BoundaryEnhancementLoss(include_background=True, padding=padding, impl=impl, spacing=spacing,
                                   smoothing_passes=2)(p, y)
    gp, gy = torch.autograd.grad(loss, (p, y), create_graph=True)
    return torch.autograd.grad((gp * v_pred).sum() + (gy * v_label).sum(), (p, y))


@pytest.mark.parametrize("padding", ["same", "valid"])
@pytest.mark.parametrize("spacing", [None, (0.8, 1.0, 2.0)])
def test_fast_loss_supports_double_backward_hessian_vector_products_match_reference(padding, spacing):
    pred, label = sample((2, 2, 10, 11, 12), torch.float64)
    gen = torch.Generator().manual_seed(3)
    v_pred = torch.randn(pred.shape, generator=gen, dtype=torch.float64)
    v_label = torch.randn(pred.shape, generator=gen, dtype=torch.float64)
    fast = _hessian_vector_products("fast", padding, spacing, pred, label, v_pred, v_label)
    ref = _hessian_vector_products("reference", padding, spacing, pred, label, v_pred, v_label)
    for a, b in zip(fast, ref):
        assert b.abs().max() > 1e-6  # a non-trivial product
        torch.testing.assert_close(a, b, rtol=0, atol=1e-8)
    # The loss is a quadratic form in P - Y, so its Hessian is [[A, -A], [-A, A]].
    torch.testing.assert_close(fast[0], -fast[1], rtol=0, atol=1e-10)


@pytest.mark.parametrize("padding", ["same", "valid"])
def test_fast_loss_supports_double_backward_gradgradcheck(padding):
    pred, label = sample((1, 2, 7, 8, 7), torch.float64)
    pred.requires_grad_(True)
    label.requires_grad_(True)
    loss = BoundaryEnhancementLoss(include_background=True, smoothing_passes=1, padding=padding, reduction="none")
    assert torch.autograd.gradgradcheck(loss, (pred, label), eps=1e-6, atol=1e-7)


@pytest.mark.parametrize("mode", ["inference_mode", "no_grad"])
def test_calls_under_inference_mode_do_not_affect_later_training_calls(mode):
    """Lightning validates under inference_mode; a later training call must work and be unchanged."""
    pred, label = sample((2, 1, 12, 12, 12))
    loss = BoundaryEnhancementLoss(include_background=True)
    trained = pred.clone().requires_grad_(True)
    expected_value = loss(trained, label)
    expected_value.backward()
    expected_grad = trained.grad.clone()
    context = torch.inference_mode if mode == "inference_mode" else torch.no_grad
    with context():
        for _ in range(3):  # same shapes, so a kept buffer would be handed on
            loss(torch.rand_like(pred), label)
            log_filter(torch.rand_like(pred))
    again = pred.clone().requires_grad_(True)
    value = loss(again, label)
    value.backward()
    torch.testing.assert_close(value, expected_value.detach(), rtol=0, atol=0)
    torch.testing.assert_close(again.grad, expected_grad, rtol=0, atol=0)


def _holds_tensor(value, depth: int = 0) -> bool:
    if isinstance(value, torch.Tensor):
        return True
    if depth > 2 or isinstance(value, (str, bytes, type)) or callable(value) and not hasattr(value, "__dict__"):
        return False
    if isinstance(value, dict):
        return any(_holds_tensor(v, depth + 1) for v in value.values())
    if isinstance(value, (list, tuple, set)):
        return any(_holds_tensor(v, depth + 1) for v in value)
    if hasattr(value, "__dict__") and not isinstance(value, type(np)):
        return any(_holds_tensor(v, depth + 1) for v in vars(value).values())
    return False


def test_the_loss_modules_hold_no_tensors_between_calls():
    """No process-global tensors (a buffer pool, a cache): nothing in the loss modules outlives a call."""
    import beseg.losses.boundary_enhancement as be_module
    import beseg.losses.laplacian as lap_module

    log_filter(torch.rand(1, 1, 8, 8, 8))
    BoundaryEnhancementLoss(include_background=True)(torch.rand(1, 1, 8, 8, 8), torch.rand(1, 1, 8, 8, 8))
    for module in (lap_module, be_module):
        held = [name for name, value in vars(module).items()
                if not name.startswith("__") and not isinstance(value, type(np)) and _holds_tensor(value)]
        assert held == [], f"{module.__name__} keeps tensors in {held}"


@pytest.mark.parametrize("impl", IMPLS)
def test_multiclass_softmax_onehot_with_and_without_background(impl):
    gen = torch.Generator().manual_seed(1)
    logits = torch.randn(2, 3, 10, 10, 10, generator=gen, dtype=torch.float64)
    labels = torch.randint(0, 3, (2, 1, 10, 10, 10), generator=gen)
    probs = torch.softmax(logits, 1).numpy()
    onehot = torch.nn.functional.one_hot(labels[:, 0], 3).permute(0, 4, 1, 2, 3).double().numpy()
    full = scipy_be(probs, onehot, 3, "same")
    with_bg = BoundaryEnhancementLoss(include_background=True, softmax=True, to_onehot_y=True, impl=impl, reduction="none")
    without_bg = BoundaryEnhancementLoss(softmax=True, to_onehot_y=True, impl=impl, reduction="none")
    np.testing.assert_allclose(with_bg(logits, labels).numpy(), full, rtol=1e-10)
    np.testing.assert_allclose(without_bg(logits, labels).numpy(), full[:, 1:], rtol=1e-10)


def test_sigmoid_and_other_act():
    logits = torch.randn(1, 2, 8, 8, 8, dtype=torch.float64)
    _, label = sample((1, 2, 8, 8, 8), torch.float64)
    plain = BoundaryEnhancementLoss(include_background=True)
    torch.testing.assert_close(
        BoundaryEnhancementLoss(include_background=True, sigmoid=True)(logits, label), plain(torch.sigmoid(logits), label)
    )
    torch.testing.assert_close(
        BoundaryEnhancementLoss(include_background=True, other_act=torch.tanh)(logits, label), plain(torch.tanh(logits), label)
    )


@pytest.mark.parametrize("impl", IMPLS)
def test_reductions(impl):
    pred, label = sample((3, 2, 8, 9, 10), torch.float64)
    none = BoundaryEnhancementLoss(include_background=True, reduction="none", impl=impl)(pred, label)
    assert none.shape == (3, 2)
    mean = BoundaryEnhancementLoss(include_background=True, reduction="mean", impl=impl)(pred, label)
    total = BoundaryEnhancementLoss(include_background=True, reduction="sum", impl=impl)(pred, label)
    assert mean.ndim == 0 and total.ndim == 0
    torch.testing.assert_close(mean, none.mean())
    torch.testing.assert_close(total, none.sum())
    without_bg = BoundaryEnhancementLoss(include_background=False, reduction="none", impl=impl)(pred, label)
    assert without_bg.shape == (3, 1)
    torch.testing.assert_close(without_bg, none[:, 1:])


@pytest.mark.parametrize("impl", IMPLS)
def test_batch_items_are_independent(impl):
    pred, label = sample((4, 1, 8, 8, 8), torch.float64, seed=3)
    loss = BoundaryEnhancementLoss(include_background=True, reduction="none", impl=impl)
    whole = loss(pred, label)
    for i in range(4):
        torch.testing.assert_close(whole[i], loss(pred[i : i + 1], label[i : i + 1])[0])


def test_dice_be_is_dice_plus_weighted_be():
    gen = torch.Generator().manual_seed(2)
    logits = torch.randn(2, 2, 12, 12, 12, generator=gen, dtype=torch.float64)
    labels = torch.randint(0, 2, (2, 1, 12, 12, 12), generator=gen)
    combo = DiceBELoss(softmax=True, to_onehot_y=True)
    dice = DiceLoss(softmax=True, to_onehot_y=True)(logits, labels)
    be = BoundaryEnhancementLoss(include_background=True, softmax=True, to_onehot_y=True)(logits, labels)
    torch.testing.assert_close(combo(logits, labels), dice + 1000.0 * be)
    weighted = DiceBELoss(softmax=True, to_onehot_y=True, include_background=False, lambda_dice=0.5, lambda_be=10.0)
    dice_fg = DiceLoss(softmax=True, to_onehot_y=True, include_background=False)(logits, labels)
    be_fg = BoundaryEnhancementLoss(softmax=True, to_onehot_y=True)(logits, labels)
    torch.testing.assert_close(weighted(logits, labels), 0.5 * dice_fg + 10.0 * be_fg)


def test_dice_be_gradients_flow_and_sum_reduction():
    logits = torch.randn(1, 2, 10, 10, 10, requires_grad=True)
    labels = torch.randint(0, 2, (1, 1, 10, 10, 10))
    loss = DiceBELoss(softmax=True, to_onehot_y=True, reduction="sum")(logits, labels)
    loss.backward()
    assert torch.isfinite(logits.grad).all() and logits.grad.abs().sum() > 0


@pytest.mark.parametrize("impl", IMPLS)
def test_bfloat16_autocast_on_cpu(impl):
    torch.manual_seed(0)
    conv = torch.nn.Conv3d(1, 2, 3, padding=1)
    image = torch.randn(2, 1, 16, 16, 16)
    labels = (image > 0.3).long()
    loss = DiceBELoss(softmax=True, to_onehot_y=True, impl=impl)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = conv(image)
        assert logits.dtype == torch.bfloat16
        value = loss(logits, labels)
    value.backward()
    assert torch.isfinite(value) and value.dtype == torch.float32
    assert all(torch.isfinite(p.grad).all() for p in conv.parameters())
    reference = loss(logits.detach().float(), labels)  # same bf16-rounded logits, float32 loss
    torch.testing.assert_close(value.detach(), reference, rtol=1e-2, atol=0)
    exact = loss(conv(image), labels)  # float32 end to end: differs only through the bf16 convolution
    torch.testing.assert_close(value.detach(), exact.detach(), rtol=5e-2, atol=0)


def test_half_precision_prediction_gives_float32_loss_and_input_dtype_gradient():
    pred, label = sample((1, 1, 12, 12, 12))
    half = pred.to(torch.bfloat16).requires_grad_(True)
    value = BoundaryEnhancementLoss(include_background=True)(half, label)
    value.backward()
    assert value.dtype == torch.float32 and half.grad.dtype == torch.bfloat16
    expected = BoundaryEnhancementLoss(include_background=True)(half.detach().float(), label)
    torch.testing.assert_close(value.detach(), expected, rtol=1e-6, atol=0)


def test_2d_and_3d_use_the_matching_stencil():
    img2d = torch.zeros(1, 1, 9, 9, dtype=torch.float64)
    img2d[0, 0, 4, 4] = 1.0
    out = log_filter(img2d, smoothing_passes=0)
    assert out[0, 0, 4, 4] == -4 and out[0, 0, 3, 4] == 1 and out[0, 0, 3, 3] == 0
    img3d = torch.zeros(1, 1, 5, 5, 5, dtype=torch.float64)
    img3d[0, 0, 2, 2, 2] = 1.0
    out = log_filter(img3d, smoothing_passes=0)
    assert out[0, 0, 2, 2, 2] == -6 and out[0, 0, 1, 2, 2] == 1 and out[0, 0, 1, 1, 2] == 0
    box = log_filter(img3d, smoothing_passes=1)  # box then Laplacian of a point
    assert box.sum().abs() < 1e-12  # interior: a Laplacian sums to zero


def test_valid_padding_shape_and_interior():
    x = torch.rand(1, 1, 12, 13, 14, dtype=torch.float64)
    valid = log_filter(x, smoothing_passes=1, padding="valid")
    assert valid.shape == (1, 1, 8, 9, 10)
    torch.testing.assert_close(valid, log_filter(x, smoothing_passes=1)[..., 2:-2, 2:-2, 2:-2])


# ---------------------------------------------------------------------------------------------
# bad input

GOOD_PRED = torch.rand(1, 2, 8, 8, 8)
GOOD_LABEL = torch.randint(0, 2, (1, 1, 8, 8, 8))


@pytest.mark.parametrize(
    "kwargs,pred,label,error,match",
    [
        ({}, torch.rand(2, 8, 8), torch.rand(2, 8, 8), ValueError, "input must have shape"),
        ({}, torch.rand(1, 1, 2, 8, 8, 8), torch.rand(1, 1, 2, 8, 8, 8), ValueError, "6 dimensions"),
        ({}, torch.rand(1, 1, 8, 8, 8), torch.rand(1, 8, 8, 8), ValueError, "same number of dimensions"),
        ({}, torch.rand(1, 1, 8, 8, 8), torch.rand(1, 1, 8, 8, 7), ValueError, "batch and spatial sizes"),
        ({"to_onehot_y": True}, GOOD_PRED, torch.randint(0, 2, (1, 2, 8, 8, 8)), ValueError, "one channel of class indices"),
        ({}, torch.rand(1, 2, 8, 8, 8), torch.rand(1, 3, 8, 8, 8), ValueError, "different shape"),
        ({}, torch.ones(1, 1, 8, 8, 8, dtype=torch.long), torch.rand(1, 1, 8, 8, 8), TypeError, "floating-point"),
        ({}, torch.ones(1, 1, 8, 8, 8, dtype=torch.bool), torch.rand(1, 1, 8, 8, 8), TypeError, "floating-point"),
        ({}, [[1.0]], torch.rand(1, 1, 8, 8, 8), TypeError, "input must be a torch.Tensor"),
        ({"to_onehot_y": True}, GOOD_PRED, torch.full((1, 1, 8, 8, 8), 2), ValueError, r"outside \[0, 1\]"),
        ({"to_onehot_y": True}, GOOD_PRED, torch.full((1, 1, 8, 8, 8), -1), ValueError, r"outside \[0, 1\]"),
        ({"to_onehot_y": True}, GOOD_PRED, torch.full((1, 1, 8, 8, 8), 0.5), ValueError, "non-integer"),
        ({"to_onehot_y": True}, GOOD_PRED, torch.full((1, 1, 8, 8, 8), float("nan")), ValueError, "NaN or Inf"),
        ({}, torch.full((1, 1, 8, 8, 8), float("nan")), torch.rand(1, 1, 8, 8, 8), ValueError, "input contains NaN or Inf"),
        ({}, torch.full((1, 1, 8, 8, 8), float("inf")), torch.rand(1, 1, 8, 8, 8), ValueError, "input contains NaN or Inf"),
        ({}, torch.rand(1, 1, 8, 8, 8), torch.full((1, 1, 8, 8, 8), float("-inf")), ValueError, "target contains NaN or Inf"),
        ({"softmax": True}, torch.full((1, 2, 8, 8, 8), float("inf")), torch.rand(1, 2, 8, 8, 8), ValueError, "input contains NaN"),
        ({"padding": "valid"}, torch.rand(1, 1, 8, 8, 8), torch.rand(1, 1, 8, 8, 8), ValueError, "needs spatial sizes larger than \\[8, 8, 8\\]"),
    ],
)
@pytest.mark.parametrize("impl", IMPLS)
def test_bad_input_is_rejected_clearly(kwargs, pred, label, error, match, impl):
    loss = BoundaryEnhancementLoss(include_background=True, impl=impl, **kwargs)
    with pytest.raises(error, match=match):
        loss(pred, label)


@pytest.mark.parametrize(
    "kwargs,error,match",
    [
        ({"sigmoid": True, "softmax": True}, ValueError, "more than one of sigmoid"),
        ({"softmax": True, "other_act": torch.tanh}, ValueError, "more than one of sigmoid"),
        ({"other_act": "tanh"}, TypeError, "other_act must be None or callable"),
        ({"smoothing_passes": -1}, ValueError, "smoothing_passes must be an integer >= 0"),
        ({"smoothing_passes": 1.5}, ValueError, "smoothing_passes must be an integer >= 0"),
        ({"padding": "reflect"}, ValueError, "padding must be one of"),
        ({"impl": "cuda"}, ValueError, "impl must be one of"),
        ({"reduction": "avg"}, ValueError, "avg"),
    ],
)
def test_bad_arguments_are_rejected_clearly(kwargs, error, match):
    with pytest.raises(error, match=match):
        BoundaryEnhancementLoss(**kwargs)
    if "reduction" not in kwargs:
        with pytest.raises(error, match=match):
            DiceBELoss(**kwargs)


def test_log_filter_bad_arguments():
    with pytest.raises(TypeError, match="floating-point"):
        log_filter(torch.ones(1, 1, 4, 4, 4, dtype=torch.int32))
    with pytest.raises(ValueError, match="3 dimensions"):
        log_filter(torch.ones(1, 4, 4))
    with pytest.raises(ValueError, match="smoothing_passes"):
        log_filter(torch.ones(1, 1, 4, 4, 4), smoothing_passes=-2)
    with pytest.raises(ValueError, match="padding must be one of"):
        log_filter(torch.ones(1, 1, 4, 4, 4), padding="full")
    with pytest.raises(ValueError, match="impl must be one of"):
        log_filter(torch.ones(1, 1, 4, 4, 4), impl="slow")


def test_dice_be_rejects_none_reduction_and_negative_weights():
    with pytest.raises(ValueError, match="reduction 'mean' or 'sum'"):
        DiceBELoss(reduction="none")
    with pytest.raises(ValueError, match="must be >= 0"):
        DiceBELoss(lambda_be=-1.0)


def test_single_channel_warnings_follow_monai():
    pred, label = sample((1, 1, 8, 8, 8))
    with pytest.warns(UserWarning, match="include_background=False"):
        BoundaryEnhancementLoss()(pred, label)
    with pytest.warns(UserWarning, match="softmax=True"):
        BoundaryEnhancementLoss(include_background=True, softmax=True)(pred, label)
    with pytest.warns(UserWarning, match="to_onehot_y=True"):
        BoundaryEnhancementLoss(include_background=True, to_onehot_y=True)(pred, label)


def test_overflow_is_reported_not_hidden():
    pred = torch.full((1, 1, 8, 8, 8), 3e38)
    pred[..., 4, 4, 4] = -3e38
    with pytest.raises(ValueError, match="overflowed"):
        BoundaryEnhancementLoss(include_background=True)(pred, torch.zeros_like(pred))
    value = BoundaryEnhancementLoss(include_background=True, validate=False)(pred, torch.zeros_like(pred))
    assert not torch.isfinite(value)


def test_log_filter_module_matches_the_function_and_keeps_no_state():
    from beseg.losses import LoGFilter

    x = torch.rand(2, 2, 12, 12, 12, dtype=torch.float64)
    module = LoGFilter(smoothing_passes=1, padding="valid")
    torch.testing.assert_close(module(x), log_filter(x, 1, "valid"))
    assert list(module.parameters()) == [] and module(x).shape == (2, 2, 8, 8, 8)
    with pytest.raises(ValueError, match="padding must be one of"):
        LoGFilter(padding="full")


# ----------------------------------------------------------------------------------------------
# no device-to-host reads with validate=False


# A tensor on the "meta" device has a shape but no values: any read of a value (item, bool, tolist...)
# raises, exactly where a CUDA tensor would synchronise the stream. The CUDA test below checks the same
# with torch.cuda.set_sync_debug_mode("error") on a GPU.


@pytest.mark.parametrize("labels_dtype", [torch.int64, torch.uint8, torch.float32])
@pytest.mark.parametrize("loss_cls", [BoundaryEnhancementLoss, DiceBELoss])
@pytest.mark.parametrize("impl", IMPLS)
def test_validate_false_reads_nothing_back_from_the_device(loss_cls, labels_dtype, impl):
    logits = torch.randn(2, 3, 10, 10, 10, device="meta", requires_grad=True)
    labels = torch.zeros(2, 1, 10, 10, 10, device="meta", dtype=labels_dtype)
    mask = torch.ones(2, 1, 10, 10, 10, device="meta", dtype=torch.bool)
    loss = loss_cls(softmax=True, to_onehot_y=True, validate=False, impl=impl)
    loss(logits, labels).backward()
    loss(logits, labels, mask=mask).backward()
    assert logits.grad.shape == logits.shape


def test_validate_true_does_read_back_so_the_meta_guard_is_real():
    logits = torch.randn(1, 2, 8, 8, 8, device="meta")
    labels = torch.zeros(1, 1, 8, 8, 8, device="meta", dtype=torch.int64)
    with pytest.raises(RuntimeError, match="meta"):
        BoundaryEnhancementLoss(softmax=True, to_onehot_y=True)(logits, labels)


def test_validate_false_skips_index_checks_but_keeps_shape_checks():
    logits = torch.randn(1, 2, 8, 8, 8)
    with pytest.raises(ValueError, match="outside \\[0, 1\\]"):
        BoundaryEnhancementLoss(softmax=True, to_onehot_y=True)(logits, torch.full((1, 1, 8, 8, 8), 1.0) * 5)
    with pytest.raises(ValueError, match="batch and spatial sizes"):
        BoundaryEnhancementLoss(softmax=True, to_onehot_y=True, validate=False)(logits, torch.zeros(1, 1, 8, 8, 7))


def test_check_finite_is_a_deprecated_alias_of_validate():
    with pytest.warns(DeprecationWarning, match="validate"):
        loss = BoundaryEnhancementLoss(check_finite=False)
    assert loss.validate is False and loss.check_finite is False


# ----------------------------------------------------------------------------------------------
# spacing-aware filter


def scipy_log_spacing(x: np.ndarray, passes: tuple[int, ...], weights: tuple[float, ...]) -> np.ndarray:
    """Independent spacing-aware filter: per-axis 3-tap means, then a weighted sum of second differences."""
    out = x.astype(np.float64)
    for axis, n in enumerate(passes):
        for _ in range(n):
            out = ndimage.uniform_filter1d(out, size=3, axis=axis, mode="constant", cval=0.0)
    return sum(w * ndimage.correlate1d(out, [1.0, -2.0, 1.0], axis=axis, mode="constant", cval=0.0)
               for axis, w in enumerate(weights))


@pytest.mark.parametrize("spacing, passes, weights", [
    # passes = round(3 * (s_min / s)^2), weights = (s_min / s)^2, written out by hand
    ((0.8, 0.8, 5.0), (3, 3, 0), (1.0, 1.0, 0.0256)),
    ((1.0, 1.5, 2.0), (3, 1, 1), (1.0, 1 / 2.25, 0.25)),
    ((2.0, 1.0), (1, 3), (0.25, 1.0)),
])
@pytest.mark.parametrize("impl", IMPLS)
def test_spacing_aware_filter_matches_an_independent_computation(spacing, passes, weights, impl):
    shape = (2, 1, 9, 10, 11)[: 2 + len(spacing)]
    x, _ = sample(shape, torch.float64)
    got = log_filter(x, 3, "same", impl, spacing=spacing).numpy()
    for i in range(shape[0]):
        np.testing.assert_allclose(got[i, 0], scipy_log_spacing(x[i, 0].numpy(), passes, weights), rtol=0, atol=1e-12)


@pytest.mark.parametrize("impl", IMPLS)
def test_isotropic_spacing_is_exactly_the_papers_filter(impl):
    x, _ = sample((1, 2, 9, 9, 9), torch.float64)
    torch.testing.assert_close(log_filter(x, impl=impl, spacing=(1.5, 1.5, 1.5)), log_filter(x, impl=impl), rtol=0, atol=0)


@pytest.mark.parametrize("padding", ["same", "valid"])
def test_spacing_aware_loss_fast_matches_reference_with_gradients(padding):
    pred, label = sample((2, 2, 14, 13, 12), torch.float64)
    spacing = (0.8, 0.8, 2.5)
    values, grads = [], []
    for impl in IMPLS:
        p = pred.clone().requires_grad_(True)
        value = BoundaryEnhancementLoss(include_background=True, impl=impl, padding=padding, spacing=spacing)(p, label)
        value.backward()
        values.append(value.detach())
        grads.append(p.grad)
    torch.testing.assert_close(values[0], values[1], rtol=1e-10, atol=0)
    torch.testing.assert_close(grads[0], grads[1], rtol=0, atol=1e-12)
    # valid padding loses one voxel per 3-tap stage of that axis: passes (3, 3, 0) -> margins (4, 4, 1)
    out = log_filter(pred, padding="valid", spacing=spacing)
    assert out.shape[2:] == (14 - 8, 13 - 8, 12 - 2)


def test_spacing_must_match_the_spatial_axes():
    with pytest.raises(ValueError, match="one value per spatial axis"):
        BoundaryEnhancementLoss(spacing=(1.0, 1.0))(torch.rand(1, 1, 8, 8, 8), torch.rand(1, 1, 8, 8, 8))
    with pytest.raises(ValueError, match="spacing must be 2 or 3 positive"):
        BoundaryEnhancementLoss(spacing=(1.0, -1.0, 1.0))
    with pytest.raises(ValueError, match="spacing must be 2 or 3 positive"):
        log_filter(torch.rand(1, 1, 8, 8, 8), spacing=(1.0, float("nan"), 1.0))


# ----------------------------------------------------------------------------------------------
# mask (ignore label)


def test_masked_voxels_contribute_nothing_and_get_no_gradient():
    pred, label = sample((1, 2, 12, 12, 12), torch.float64)
    mask = torch.ones(1, 1, 12, 12, 12, dtype=torch.bool)
    mask[..., 3:7, 2:9, 4:10] = False
    loss = BoundaryEnhancementLoss(include_background=True)
    p = pred.clone().requires_grad_(True)
    value = loss(p, label, mask=mask)
    value.backward()
    # Independent: the masked difference filtered by scipy, mean over the voxels that count.
    diff = ((pred - label) * mask).numpy()
    n = int(mask.sum())
    expected = np.mean([np.sum(scipy_log(diff[0, c], 3, "same") ** 2) / n for c in range(2)])
    assert abs(value.item() - expected) < 1e-12
    assert p.grad[~mask.expand_as(p)].abs().max() == 0
    # Whatever prediction and label hold under the mask, the loss is the same.
    scrambled_pred = torch.where(mask, pred, torch.rand_like(pred))
    scrambled_label = torch.where(mask, label, 1 - label)
    torch.testing.assert_close(loss(scrambled_pred, scrambled_label, mask=mask), value.detach(), rtol=0, atol=1e-14)


def _sparse_masks(shape, seed=0):
    """(B, 1, ...) masks: item 0 annotated in a block, item 1 not at all (every voxel ignored)."""
    mask = torch.zeros(shape[0], 1, *shape[2:], dtype=torch.bool)
    mask[0, :, 2:-3, 1:-2, 3:] = True
    return mask


@pytest.mark.parametrize("padding", ["same", "valid"])
def test_masked_mean_is_over_the_voxels_that_count_per_reduction(padding):
    pred, label = sample((3, 2, 12, 13, 11), torch.float64)
    mask = torch.zeros(3, 1, 12, 13, 11, dtype=torch.bool)
    mask[0, :, 2:9, 1:11, 3:] = True  # a block
    mask[1, :, :, :, :6] = True       # a few slices (two of them inside the valid border)
    # item 2: nothing annotated
    diff = ((pred - label) * mask).numpy()
    inner = (slice(None),) * 2 if padding == "same" else (slice(4, -4),) * 3
    sums = np.array([[np.sum(scipy_log(diff[b, c], 3, padding) ** 2) for c in range(2)] for b in range(3)])
    counts = np.array([mask[b, 0].numpy()[inner].sum() for b in range(3)], dtype=np.float64)[:, None]
    counts = np.broadcast_to(counts, sums.shape)
    assert counts[0, 0] > 0 and counts[1, 0] > 0 and counts[2, 0] == 0
    per_item = np.where(counts > 0, sums / np.maximum(counts, 1), 0.0)
    expected = {"none": per_item, "sum": per_item.sum(), "mean": np.where(counts > 0, sums, 0).sum() / counts.sum()}
    for reduction, want in expected.items():
        for impl in IMPLS:
            loss = BoundaryEnhancementLoss(include_background=True, padding=padding, reduction=reduction, impl=impl)
            got = loss(pred, label, mask=mask).numpy()
            np.testing.assert_allclose(got, want, rtol=1e-10, atol=0)
    # An unannotated item changes nothing in the mean, and it is finite.
    mean = BoundaryEnhancementLoss(include_background=True, padding=padding)
    torch.testing.assert_close(mean(pred, label, mask=mask), mean(pred[:2], label[:2], mask=mask[:2]))
    nothing = mean(pred[2:], label[2:], mask=mask[2:])
    assert nothing.item() == 0.0


@pytest.mark.parametrize("padding", ["same", "valid"])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("channel_mask", [False, True])
def test_masked_fast_gradient_matches_autograd_of_the_reference(padding, reduction, channel_mask):
    pred, label = sample((2, 2, 10, 11, 10), torch.float64, seed=3)
    mask = _sparse_masks(pred.shape)
    if channel_mask:  # a mask per channel: channel 1 of item 0 annotated on fewer voxels
        mask = mask.repeat(1, 2, 1, 1, 1)
        mask[0, 1, :5] = False
    weights = torch.rand(2, 2, dtype=torch.float64) if reduction == "none" else None
    out = {}
    for impl in IMPLS:
        p = pred.clone().requires_grad_(True)
        value = BoundaryEnhancementLoss(include_background=True, padding=padding, reduction=reduction,
                                        impl=impl)(p, label, mask=mask)
        (value * weights).sum().backward() if weights is not None else value.backward()
        out[impl] = (value.detach(), p.grad)
        assert torch.isfinite(p.grad).all() and p.grad[1].abs().max() == 0  # the unannotated item: no gradient
    torch.testing.assert_close(out["fast"][0], out["reference"][0], rtol=1e-10, atol=0)
    torch.testing.assert_close(out["fast"][1], out["reference"][1], rtol=1e-8, atol=1e-14)


@pytest.mark.parametrize("padding", ["same", "valid"])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_masked_fast_loss_gradcheck(padding, reduction):
    pred, label = sample((2, 1, 9, 10, 9), torch.float64, seed=4)
    mask = _sparse_masks(pred.shape)
    mask[1, :, 1:5, 2:6, 3:7] = True
    loss = BoundaryEnhancementLoss(include_background=True, padding=padding, reduction=reduction, impl="fast")
    assert torch.autograd.gradcheck(lambda p, y: loss(p, y, mask=mask),
                                    (pred.requires_grad_(True), label.requires_grad_(True)))


def test_masked_be_does_not_shrink_with_the_annotated_fraction():
    """The issue's case: the BE of the same predictions, annotated on 100 %, 12.5 % and 1.6 % of the patch.

    With the mean over all voxels it shrank in proportion (0.001216, 0.000163, 0.000020 in the
    nnU-Net trainer); over the voxels that count it stays about the same.
    """
    pred, label = _periodic_case()
    loss = BoundaryEnhancementLoss(softmax=True, to_onehot_y=True)
    full = loss(pred, label).item()
    for side in (16, 8):  # 12.5 % and 1.6 % of 32^3
        mask = torch.zeros(2, 1, 32, 32, 32, dtype=torch.bool)
        mask[..., 8:8 + side, 8:8 + side, 8:8 + side] = True
        ratio = loss(pred, label, mask=mask).item() / full
        assert 0.75 < ratio < 1.5, (side, ratio)
        # The DiceBE's BE term is the same mean.
        dice_be = DiceBELoss(softmax=True, to_onehot_y=True, include_background=False, lambda_dice=0.0)
        torch.testing.assert_close(dice_be(pred, label, mask=mask), 1000 * loss(pred, label, mask=mask))


def _periodic_case():
    """Logits and labels with the same statistics everywhere: a periodic pattern of 4-voxel cubes."""
    idx = torch.arange(32)
    i, j, k = torch.meshgrid(idx, idx, idx, indexing="ij")
    label = ((i // 4 + 2 * (j // 4) + k // 4) % 3).expand(2, 1, 32, 32, 32)
    wobble = torch.sin(i * 0.7) * torch.cos(j * 0.9) + torch.sin(k * 1.3)
    logits = 2.0 * torch.nn.functional.one_hot(label[:, 0], 3).permute(0, 4, 1, 2, 3).float() + wobble
    return logits, label


def test_mask_shape_is_checked():
    pred, label = sample((1, 2, 8, 8, 8))
    with pytest.raises(ValueError, match="mask must have shape"):
        BoundaryEnhancementLoss()(pred, label, mask=torch.ones(1, 1, 8, 8, 7))
    with pytest.raises(TypeError, match="mask must be a torch.Tensor"):
        DiceBELoss()(pred, label, mask=np.ones((1, 1, 8, 8, 8)))


# ----------------------------------------------------------------------------------------------
# CUDA (skipped without a GPU)

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.mark.cuda
@cuda
@pytest.mark.parametrize("padding", ["same", "valid"])
def test_cuda_fast_matches_reference_float32(padding):
    pred, label = sample((2, 3, 32, 33, 34))
    pred, label = pred.cuda(), label.cuda()
    out = {}
    for impl in IMPLS:
        p = pred.clone().requires_grad_(True)
        value = BoundaryEnhancementLoss(include_background=True, impl=impl, padding=padding)(p, label)
        value.backward()
        out[impl] = (value.detach(), p.grad)
    torch.testing.assert_close(out["fast"][0], out["reference"][0], rtol=1e-4, atol=0)
    scale = out["reference"][1].abs().max()
    torch.testing.assert_close(out["fast"][1], out["reference"][1], rtol=0, atol=1e-4 * scale)


@pytest.mark.cuda
@cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_cuda_autocast_fast_matches_reference(dtype):
    torch.manual_seed(0)
    conv = torch.nn.Conv3d(1, 2, 3, padding=1).cuda()
    image = torch.randn(2, 1, 24, 24, 24, device="cuda")
    labels = (image > 0.3).long()
    results = {}
    for impl in IMPLS:
        conv.zero_grad()
        with torch.autocast("cuda", dtype=dtype):
            value = DiceBELoss(softmax=True, to_onehot_y=True, impl=impl)(conv(image), labels)
        value.backward()
        assert value.dtype == torch.float32 and torch.isfinite(value)
        results[impl] = (value.detach(), conv.weight.grad.clone())
    torch.testing.assert_close(results["fast"][0], results["reference"][0], rtol=1e-3, atol=0)
    torch.testing.assert_close(results["fast"][1], results["reference"][1], rtol=1e-2, atol=1e-6)


@pytest.mark.cuda
@cuda
def test_cuda_training_step_loss_makes_no_host_sync():
    logits = torch.randn(2, 3, 24, 24, 24, device="cuda", requires_grad=True)
    labels = torch.randint(0, 3, (2, 1, 24, 24, 24), device="cuda")
    mask = torch.rand(2, 1, 24, 24, 24, device="cuda") > 0.3  # the mean over the voxels that count: no read-back
    loss = DiceBELoss(softmax=True, to_onehot_y=True, validate=False)
    loss(logits, labels).backward()  # warm-up: lazy initialisation may sync once
    loss(logits, labels, mask=mask).backward()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        value = loss(logits, labels) + loss(logits, labels, mask=mask)
        value.backward()
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert torch.isfinite(value).item()


# ----------------------------------------------------------------------------------------------
# chunked CPU evaluation


@pytest.mark.parametrize("chunk_volumes", [1, 2])
@pytest.mark.parametrize("padding, spacing", [("same", None), ("valid", None), ("valid", (0.8, 1.0, 2.0))])
def test_chunked_evaluation_equals_whole_tensor_evaluation(monkeypatch, chunk_volumes, padding, spacing):
    """Large CPU inputs are filtered a few volumes at a time; the result must not change at all."""
    import beseg.losses.laplacian as lap

    pred, label = sample((2, 3, 11, 12, 13))
    half = pred.to(torch.bfloat16)

    def run():
        out = []
        for p in (pred, half):
            p = p.clone().requires_grad_(True)
            value = BoundaryEnhancementLoss(include_background=True, padding=padding, spacing=spacing,
                                            reduction="none")(p, label)
            value.sum().backward()
            out += [value.detach(), p.grad, log_filter(p.detach().float(), padding=padding, spacing=spacing)]
        return out

    whole = run()
    monkeypatch.setattr(lap, "_CPU_CHUNK_BYTES", chunk_volumes * 11 * 12 * 13 * 4)
    assert len(lap.cpu_chunks(pred)) == 2 * (3 if chunk_volumes == 1 else 2)
    chunked = run()
    for a, b in zip(whole, chunked):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_print_shows_the_settings_of_each_loss_module():
    be = BoundaryEnhancementLoss(sigmoid=True, smoothing_passes=1, padding="valid", impl="reference", spacing=(1, 1, 5))
    assert "activation=sigmoid" in repr(be) and "smoothing_passes=1, padding=valid, impl=reference" in repr(be)
    assert "spacing=(1.0, 1.0, 5.0)" in repr(be)
    dbe = DiceBELoss(softmax=True, to_onehot_y=True, lambda_be=30.0)
    assert "lambda_dice=1, lambda_be=30" in repr(dbe).splitlines()[1]
    assert repr(LoGFilter(smoothing_passes=2)) == "LoGFilter(smoothing_passes=2, padding=same, impl=fast, spacing=None)"


def test_with_two_softmax_classes_the_background_channel_does_not_change_the_mean_be():
    # The README's reason why the two losses may keep different include_background defaults: the
    # background's probabilities are 1 - the foreground's, so its filtered difference is the negative.
    g = torch.Generator().manual_seed(5)
    x, y = torch.randn(2, 2, 12, 12, 12, generator=g), torch.randint(0, 2, (2, 1, 12, 12, 12), generator=g)
    with_bg = BoundaryEnhancementLoss(softmax=True, to_onehot_y=True, include_background=True)(x, y)
    without = BoundaryEnhancementLoss(softmax=True, to_onehot_y=True, include_background=False)(x, y)
    assert float(with_bg) == pytest.approx(float(without), rel=1e-6)
    three = torch.randn(2, 3, 12, 12, 12, generator=g), torch.randint(0, 3, (2, 1, 12, 12, 12), generator=g)
    a = BoundaryEnhancementLoss(softmax=True, to_onehot_y=True, include_background=True)(*three)
    b = BoundaryEnhancementLoss(softmax=True, to_onehot_y=True, include_background=False)(*three)
    assert float(a) != pytest.approx(float(b), rel=1e-3)  # with three classes it does
