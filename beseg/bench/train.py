"""Training-step benchmark: what share of a SegResNet step the BE loss costs, and how long
sliding-window inference takes per volume. All figures are measured side by side in one run.

For each loss (DiceLoss, DiceBELoss) it times a full step (forward, loss, backward, Adam) of
SegResNet on one patch, and the loss alone (forward+backward on the same logits), then prints
the BE term's share of the step: ``(t_loss(DiceBE) - t_loss(Dice)) / t_step(DiceBE)``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn

from beseg.bench.loss import apply_malloc, machine_description
from beseg.engine.config import LossConfig, ModelConfig
from beseg.engine.inference import autocast_for, predict_probabilities
from beseg.engine.networks import build_network
from beseg.engine.losses import build_loss
from beseg.engine.measure import median_seconds
from beseg.errors import ConfigError

__all__ = ["run_train_benchmark"]


def run_train_benchmark(
    patch: Sequence[int] = (96, 96, 96),
    init_filters: int = 16,
    repeats: int = 3,
    volume: Sequence[int] = (160, 160, 160),
    overlap: float = 0.25,
    threads: int = 2,
    device: str = "cpu",
    malloc: str = "default",
    print_fn: Callable[[str], None] = print,
) -> dict[str, float]:
    """Time SegResNet training steps with Dice and Dice+BE, the losses alone, and inference.

    Args:
        patch: training patch (voxels), batch 1, one input channel, two output classes (softmax).
        init_filters: SegResNet width (16 in the paper's network).
        repeats: timed repetitions (median reported), after one warm-up.
        volume: whole volume for sliding-window inference (voxels).
        overlap: sliding-window overlap.
        threads: torch CPU threads.
        device: ``"cpu"`` or a CUDA device; on CUDA the network runs under float16 autocast with a
            gradient scaler, as ``beseg train`` does (the loss itself computes in float32).
        malloc: ``"default"`` or ``"keep"`` (CPU: keep freed memory, as ``beseg train`` does).
        print_fn: where lines go.

    Returns:
        The measured seconds and the BE share, by name.
    """
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"--device {device}: CUDA is not available on this machine.")
    malloc_note = apply_malloc(malloc)
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    net = build_network(ModelConfig(network="segresnet", init_filters=init_filters), 1, 2).to(dev)
    opt = torch.optim.Adam(net.parameters(), lr=1e-4)
    amp = dev.type == "cuda"
    scaler = torch.amp.GradScaler("cuda", enabled=amp)
    image = torch.randn(1, 1, *patch, device=dev)
    label = (torch.rand(1, 1, *patch, device=dev) > 0.7).long()
    losses: dict[str, nn.Module] = {
        "dice": build_loss(LossConfig(name="dice", include_background=True), "softmax"),
        "dice_be": build_loss(LossConfig(name="dice_be", include_background=True), "softmax"),
    }

    def step(loss_fn: nn.Module) -> Callable[[], None]:
        def run() -> None:
            opt.zero_grad(set_to_none=True)
            with autocast_for(dev, amp):
                logits = net(image)
            scaler.scale(loss_fn(logits.float(), label)).backward()
            scaler.step(opt)
            scaler.update()
        return run

    with autocast_for(dev, amp):
        logits = net(image).detach().float()

    def loss_only(loss_fn: nn.Module) -> Callable[[], None]:
        def run() -> None:
            x = logits.clone().requires_grad_(True)
            loss_fn(x, label).backward()
        return run

    print_fn(f"# beseg bench train: SegResNet (init_filters {init_filters}, blocks 1,2,2,4 / 1,1,1), patch "
             f"{'x'.join(map(str, patch))}, batch 1, softmax 2 classes{', float16 autocast' if amp else ''}; "
             f"median of {repeats} after 1 warm-up")
    print_fn(f"# machine: {machine_description(dev, threads, malloc_note)}")
    out: dict[str, float] = {}
    # Interleave the two losses so that machine noise hits both alike.
    for name, fn in losses.items():
        out[f"step_{name}_s"] = median_seconds(step(fn), repeats, device=dev)
        out[f"loss_{name}_s"] = median_seconds(loss_only(fn), max(repeats, 5), device=dev)
    be_cost = max(out["loss_dice_be_s"] - out["loss_dice_s"], 0.0)
    out["be_share_of_step"] = be_cost / out["step_dice_be_s"]
    out["dice_be_loss_share_of_step"] = out["loss_dice_be_s"] / out["step_dice_be_s"]
    for name in losses:
        print_fn(f"{name:<8} training step {out[f'step_{name}_s']:.3f} s; loss forward+backward alone "
                 f"{out[f'loss_{name}_s'] * 1e3:.2f} ms")
    print_fn(f"BE term: {be_cost * 1e3:.2f} ms = {out['be_share_of_step'] * 100:.3f} % of a SegResNet + Dice+BE step "
             f"(the whole Dice+BE loss: {out['dice_be_loss_share_of_step'] * 100:.3f} %)")

    net.eval()
    vol = torch.randn(1, 1, *volume, device=dev)
    out["sliding_window_s"] = median_seconds(
        lambda: predict_probabilities(net, vol, patch, "softmax", overlap=overlap, sw_batch_size=1, amp=amp),
        max(1, repeats - 1), device=dev)
    print_fn(f"sliding-window inference, volume {'x'.join(map(str, volume))}, roi {'x'.join(map(str, patch))}, "
             f"overlap {overlap}: {out['sliding_window_s']:.2f} s per volume")
    return out
