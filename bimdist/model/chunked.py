"""Decoder and loss over slices of the batch, recomputed in backward (``model.decoder_chunks``).

A BIM stage keeps two graphs for backward: its encoder layers on the visible tokens, and its decoder on *all*
tokens (visible plus mask tokens), which is usually the larger of the two. Samples are independent in the
decoder, so it can run slice by slice: the forward keeps only the decoder's input, and the backward
recomputes one slice at a time and hands the summed gradient to the encoder. Peak activation memory falls
to the encoder's plus 1/chunks of the decoder's, for one extra decoder forward per step. The gradients are
the same as without chunking (up to float summation order).

torch.utils.checkpoint recomputes a whole region at once; slicing the batch inside one recomputation is
what it does not do, hence this small autograd function. Parameters are inputs of the function, so each
parameter's gradient is accumulated once per backward, as DDP and DeepSpeed's ZeRO hooks expect.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

# (decoder input rows, their row range) -> (this slice's share of the loss, this slice's prediction)
SliceLoss = Callable[[torch.Tensor, slice], tuple[torch.Tensor, torch.Tensor]]


def batch_slices(n: int, chunks: int) -> list[slice]:
    """``chunks`` contiguous row ranges covering 0..n, sizes differing by at most one (none empty)."""
    chunks = max(1, min(chunks, n))
    bounds = [n * i // chunks for i in range(chunks + 1)]
    return [slice(a, b) for a, b in zip(bounds[:-1], bounds[1:])]


def _run_slices(fn: SliceLoss, h: torch.Tensor, slices: list[slice]) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed loss and concatenated prediction [N, L, p*p*C] of ``fn`` over ``slices`` of ``h``."""
    losses, preds = zip(*(fn(h[rows], rows) for rows in slices))
    return torch.stack(losses).sum(), torch.cat(preds)


class _ChunkedLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h: torch.Tensor, fn: SliceLoss, chunks: int, *params: torch.Tensor):  # noqa: ANN205
        ctx.fn, ctx.slices = fn, batch_slices(h.shape[0], chunks)
        ctx.device_type = h.device.type
        ctx.autocast = torch.is_autocast_enabled(h.device.type)
        ctx.autocast_dtype = torch.get_autocast_dtype(h.device.type)
        ctx.save_for_backward(h, *params)
        # no graph: a Function's forward runs without grad; detached so hooks (the flop counter's) see a plain tensor
        loss, pred = _run_slices(fn, h.detach(), ctx.slices)
        ctx.mark_non_differentiable(pred)
        return loss, pred

    @staticmethod
    def backward(ctx, grad_loss: torch.Tensor, _grad_pred: torch.Tensor | None):  # noqa: ANN205
        h, *params = ctx.saved_tensors
        grad_h = torch.zeros_like(h)  # [N, 1+n, D]
        grad_params: list[torch.Tensor | None] = [None] * len(params)
        wanted = [i for i, p in enumerate(params) if p.requires_grad]
        for rows in ctx.slices:
            with torch.enable_grad(), torch.autocast(ctx.device_type, dtype=ctx.autocast_dtype,
                                                       enabled=ctx.autocast):
                h_leaf = h[rows].detach().requires_grad_(h.requires_grad)  # [n_rows, 1+n, D]
                # a non-leaf view: module hooks (the flop counter's) may not see a leaf inside autograd.grad
                loss, _ = ctx.fn(h_leaf.view_as(h_leaf), rows)
            inputs = ([h_leaf] if h.requires_grad else []) + [params[i] for i in wanted]
            grads = torch.autograd.grad(loss, inputs, grad_outputs=grad_loss, allow_unused=True)
            if h.requires_grad:
                grad_h[rows] = grads[0]
                grads = grads[1:]
            for i, g in zip(wanted, grads):
                if g is not None:
                    grad_params[i] = g if grad_params[i] is None else grad_params[i] + g
        return (grad_h if h.requires_grad else None), None, None, *grad_params


def chunked_loss(fn: SliceLoss, h: torch.Tensor, params: Sequence[torch.Tensor], *,
                 chunks: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Sum of ``fn`` over ``chunks`` row slices of ``h`` [N, ...]; returns (loss, detached prediction).

    ``fn`` must be deterministic (it runs again in backward) and use no parameters other than ``params``.
    """
    if not torch.is_grad_enabled():
        return _run_slices(fn, h, batch_slices(h.shape[0], chunks))
    return _ChunkedLoss.apply(h, fn, chunks, *params)
