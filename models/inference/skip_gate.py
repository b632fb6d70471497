"""One gated conv in channel-skipping form (models.SkipNet): its variants computing the same batch-1
output (skip the suppressed channels or run the dense conv; torch's conv or oneDNN; the compiled gate
kernel or torch ops) and the BN folded into its weights. models/inference/skip.py builds networks of these."""
from __future__ import annotations

__all__ = ["SkipGate", "expand", "folded", "folded_predictor", "padded", "CONVS"]

import ctypes
import functools
import math
from collections.abc import Callable
import torch
import torch.nn.functional as F
from torch import nn
from gatetune.models.errors import ModelError
from gatetune.models.gate import INPUT_GAIN, Z_CLIP, GatedConv2d
from gatetune.models.gate_ops import scale_free
from gatetune.models.inference.kernel import PAD, GateSpec, load as load_kernel
from gatetune.models.inference.autotune import cached_choice, calibrate, timed


def expand(t: torch.Tensor, idx: torch.Tensor | None, channels: int) -> torch.Tensor:
    """Compact (1, k, H, W) with channel indices idx -> full width (1, channels, H, W), zeros elsewhere."""
    if idx is None:
        return t
    out = t.new_zeros(t.shape[0], channels, *t.shape[2:])
    return out.index_copy_(1, idx, t)


def folded(g: GatedConv2d) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(W', shift, beta) with, on every channel, fbs: s * BN_noaffine(conv x) + beta ==
    s * (conv(x, W') + shift) + beta (no BN: beta None, W' = W); mse: BN(conv x) == conv(x, W') + shift."""
    conv, bn = g.conv, g.bn
    w = conv.weight.detach()
    bias = conv.bias.detach() if conv.bias is not None else torch.zeros_like(w[:, 0, 0, 0])
    if bn is None:
        return w.clone(), bias.clone(), None
    if bn.running_mean is None:
        raise ModelError("channel skipping needs BN running statistics (track_running_stats=True) to fold "
                         "the BN into the conv; use the masked GatedNet for this network")
    scale = torch.rsqrt(bn.running_var + bn.eps)
    shift = (bias - bn.running_mean) * scale
    if g.policy == "fbs":
        return w * scale[:, None, None, None], shift, g.beta.detach().clone()
    if bn.affine:
        scale, shift = scale * bn.weight.detach(), shift * bn.weight.detach() + bn.bias.detach()
    return w * scale[:, None, None, None], shift, None


def folded_predictor(g: GatedConv2d) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, float]:
    """(W, b, m, a, clip) with W . clamp((scale_free(p) - m) * a, -clip, clip) + b == predictor(predictor_input(p))
    in eval: INPUT_GAIN folded into the weight, the running standardisation kept apart (m, a = rsqrt(var + eps)),
    as the masked path computes it. (Folding m and a into the weight and bias too loses the clip's precision:
    a = 300 for an input whose running variance is ~0, and b - W a m cancels in float32.) Not standardised:
    m 0, a 1, no clip."""
    n, lin = g.pool_norm, g.predictor
    w, b = lin.weight.detach() * INPUT_GAIN, lin.bias.detach()
    if not bool(g.standardise):
        return w, b, torch.zeros_like(w[0]), torch.ones_like(w[0]), math.inf
    return w, b, n.running_mean.clone(), torch.rsqrt(n.running_var + n.eps), Z_CLIP


def padded(w: torch.Tensor) -> torch.Tensor:
    """A contiguous copy of w followed (in the same storage) by PAD zeros."""
    buf = w.new_zeros(w.numel() + PAD)
    buf[:w.numel()].copy_(w.reshape(-1))
    return buf[:w.numel()].view(w.shape)


def _conv_native(x, w, b, stride, padding, dilation, groups):
    return F.conv2d(x, w, b, stride, padding, dilation, groups)


def _conv_mkldnn(x, w, b, stride, padding, dilation, groups):
    # (torch.mkldnn_convolution reads a strided bias as if it were contiguous)
    b = b if b is None or b.is_contiguous() else b.contiguous()
    return torch.mkldnn_convolution(x.contiguous(), w.contiguous(), b, padding, stride, dilation, groups)


# conv backends a choice may pick: torch's own choice (at batch 1 often its im2col + GEMM path, which it
# prefers below ~20k input elements whether or not that is faster) and oneDNN forced
CONVS = {"native": _conv_native, "mkldnn": _conv_mkldnn}


class SkipGate(nn.Module):
    """The skipping form of one GatedConv2d (see the module docstring). compact(t, idx) -> (z, idx_out):
    t holds the channels idx of the full input (idx None: all of them), z the channels idx_out of the
    output (idx_out None: all, when k == C_out). forward(x): full width in and out.

    Variants (same output; autotune picks one per input shape by measured cost, see models/inference/autotune.py):
    skip or dense, each with the native or the mkldnn conv, computed by the compiled kernel (CPU float32
    dense-groups convs, models/inference/kernel.py) or by torch ops (otherwise, and on a NaN saliency).
    """

    def __init__(self, g: GatedConv2d, lib=None, force: str | None = None):
        super().__init__()
        self.force = force
        conv = g.conv
        self.c_in, self.c_out, self.k = conv.in_channels, conv.out_channels, g.k
        self.depthwise = conv.groups > 1 and conv.groups == conv.in_channels == conv.out_channels
        if conv.groups != 1 and not self.depthwise:
            raise ModelError(f"channel skipping supports dense (groups=1) and depthwise gated convs, not "
                             f"groups={conv.groups}; use the masked GatedNet for this network")
        if conv.padding_mode != "zeros":
            raise ModelError(f"channel skipping supports zero padding only, not {conv.padding_mode!r}; "
                             "use the masked GatedNet for this network")
        self.stride, self.padding, self.dilation = conv.stride, conv.padding, conv.dilation
        self.kernel_size = conv.kernel_size
        self.nonneg, self.scaled, self.policy = g.nonneg_input, g.policy == "fbs", g.policy
        w, shift, beta = folded(g)
        beta = beta if beta is not None else torch.zeros_like(shift)
        self.register_buffer("weight", padded(w))
        self.register_buffer("shift", shift.contiguous())
        self.register_buffer("beta", beta.contiguous())
        # [shift | beta] per output channel: one gather picks both. (Not appended to the weight rows: the
        # column gather of a non-contiguous weight is almost twice as slow.)
        self.register_buffer("shift_beta", torch.stack([shift, beta], 1))
        p_weight, p_bias, p_mean, p_scale, self.p_clip = folded_predictor(g)
        self.register_buffer("p_weight", p_weight.contiguous())
        self.register_buffer("p_bias", p_bias.contiguous())
        self.register_buffer("p_mean", p_mean.contiguous())
        self.register_buffer("p_scale", p_scale.contiguous())
        self.register_buffer("zeros_in", torch.zeros(1, self.c_in, dtype=w.dtype, device=w.device))
        self.lib = lib
        self._bind()

    # -- the compiled kernel's buffers ----------------------------------------------------------------
    def _bind(self) -> None:
        """(Re)build the kernel's view of this gate's tensors; choices are forgotten (device, dtype changed)."""
        self._choices: dict[tuple, Callable] = {}     # input key -> the chosen variant's run
        self.pending: dict[tuple, tuple] = {}      # input key -> (signature, candidates) until chosen
        self.trial = None                           # SkipNet's in-situ calibration, while it runs
        self.spec = None
        w = self.weight
        if (self.lib is None or self.depthwise or w.device.type != "cpu" or w.dtype != torch.float32
                or isinstance(self.padding, str)):
            return
        kk = self.kernel_size[0] * self.kernel_size[1]
        if w.untyped_storage().nbytes() < (w.storage_offset() + w.numel() + PAD) * w.element_size():
            self.weight = w = padded(w)   # the kernel reads up to PAD floats past the last row
        # scratch written by each call: the kept weights, bias, indices and saliencies (one call at a time:
        # SkipNet.forward holds a lock)
        self._w_buf = torch.empty(self.k * self.c_in * kk + PAD)
        self._b_buf, self._s_buf = torch.empty(self.k), torch.empty(self.k)
        self._idx_buf = torch.empty(self.k, dtype=torch.long)
        self.spec = GateSpec(self.c_in, self.c_out, self.k, kk, int(self.nonneg), int(self.scaled),
                              w.data_ptr(), self.shift.data_ptr(), self.beta.data_ptr(),
                              self.p_weight.data_ptr(), self.p_bias.data_ptr(), self.p_mean.data_ptr(),
                              self.p_scale.data_ptr(), self.p_clip)
        self._spec_ref = ctypes.byref(self.spec)

    def _apply(self, fn, recurse=True):
        out = super()._apply(fn, recurse)
        self._bind()   # .to() / .double() / .cuda() replace the tensors the kernel points at
        return out

    def __getstate__(self):   # copies and pickles: the kernel handle and the choices are rebuilt
        state = self.__dict__.copy()
        for key in ("spec", "_spec_ref", "_choices", "pending", "trial", "_w_buf", "_b_buf", "_s_buf", "_idx_buf"):
            state.pop(key, None)
        state["lib"] = state.get("lib") is not None
        return state

    def __setstate__(self, state):
        super().__setstate__(state)
        self.lib = load_kernel() if self.lib else None
        self._bind()

    # -- entry points ---------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z, idx = self.compact(x, None)
        return expand(z, idx, self.c_out)

    def compact(self, t: torch.Tensor, idx: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        key = (t.shape, idx is None, torch.get_num_threads())
        run = self._choices.get(key)
        if run is None:
            return self._unchosen(t, idx, key)
        return run(t, idx)

    @property
    def choices(self) -> dict[str, str]:
        """Chosen variant per input signature (for reports and tests)."""
        return {f"{tuple(k[0])} {'full' if k[1] else 'compact'} threads={k[2]}": v.variant
                for k, v in self._choices.items()}

    # -- choosing -------------------------------------------------------------------------------------
    def variants(self, t: torch.Tensor, idx: torch.Tensor | None) -> dict[str, Callable]:
        """Name -> run(t, idx) of every way this gate can compute its output for inputs shaped like t
        (restricted to the names holding every '-'-separated word of `force`, when set)."""
        backends = ["native"]
        if (t.device.type == "cpu" and t.dtype in (torch.float32, torch.bfloat16) and torch.backends.mkldnn.is_available()
                and not isinstance(self.padding, str)):
            backends.append("mkldnn")
        kernel = (self.spec is not None and t.device.type == "cpu" and t.dtype == torch.float32
                  and t.shape[0] == 1 and (idx is None or (idx.dtype == torch.long and idx.is_contiguous())))
        out = {}
        for b in backends:
            conv = CONVS[b]
            if kernel:
                out[f"skip-kernel-{b}"] = self._skip_kernel(t, conv)
                out[f"dense-kernel-{b}"] = self._dense_kernel(t, conv)
            else:
                out[f"skip-torch-{b}"] = functools.partial(self._skip_torch, conv=conv)
                out[f"dense-torch-{b}"] = functools.partial(self._dense_torch, conv=conv)
        if self.force:
            words = set(self.force.split("-"))
            kept = {n: fn for n, fn in out.items() if words <= set(n.split("-"))}
            if not kept:
                raise ModelError(f"force={self.force!r} matches none of this gate's variants ({', '.join(out)})")
            out = kept
        for name, fn in out.items():
            fn.variant = name
        return out

    def signature(self, t: torch.Tensor, idx: torch.Tensor | None, names) -> str:
        """What a variant's cost depends on: shapes, input, device, threads and the candidates."""
        kind = "dw" if self.depthwise else "g1"
        return (f"{t.device.type}|threads={torch.get_num_threads()}|{self.c_in}>{self.c_out} k={self.k} "
                f"{kind} kernel={tuple(self.kernel_size)} stride={tuple(self.stride)} pad={self.padding} "
                f"dil={tuple(self.dilation)} {self.policy} {'nonneg' if self.nonneg else 'signed'}|"
                f"in={'full' if idx is None else 'compact'}:{tuple(t.shape)}|{','.join(sorted(names))}")

    def _unchosen(self, t: torch.Tensor, idx: torch.Tensor | None, key: tuple):
        """Run an input shape without a choice yet: the cached choice, or time the variants (in situ, one per
        forward in turn, while SkipNet calibrates; else here, on t)."""
        if key not in self.pending:
            cands = self.variants(t, idx)
            self.pending[key] = (self.signature(t, idx, cands), cands)
        sig, cands = self.pending[key]
        choice = next(iter(cands)) if len(cands) == 1 else cached_choice(sig)
        if choice in cands:
            return self.settle(key, choice)(t, idx)
        trial = self.trial
        if trial is None:
            choice = calibrate(sig, {n: functools.partial(fn, t, idx) for n, fn in cands.items()},
                               sync=t.device.type == "cuda")
            return self.settle(key, choice)(t, idx)
        names = list(cands)
        name = names[(trial.round + trial.offset[id(self)]) % len(names)]
        out, dt = timed(functools.partial(cands[name], t, idx), sync=t.device.type == "cuda")
        trial.samples.setdefault((self, key), {n: [] for n in names})[name].append(dt)
        return out

    def settle(self, key: tuple, choice: str) -> Callable:
        """Fix the variant `choice` for the input `key` (shape, full width, threads); returns its run."""
        run = self._choices[key] = self.pending.pop(key)[1][choice]
        return run

    # -- kernel variants (CPU float32, batch 1) -------------------------------------------------------
    def _skip_kernel(self, t: torch.Tensor, conv) -> Callable:
        """Kept rows x non-zero columns of the weight, saliency folded in, gathered by gt_prepare; one conv."""
        k_in, hw = t.shape[1], t.shape[2] * t.shape[3]
        kh, kw = self.kernel_size
        w = self._w_buf[:self.k * k_in * kh * kw].view(self.k, k_in, kh, kw)
        b, idx_out = self._b_buf, (None if self.k == self.c_out else self._idx_buf)
        prepare, spec = self.lib.gt_prepare, self._spec_ref
        ptrs = (w.data_ptr(), b.data_ptr(), self._idx_buf.data_ptr(), self._s_buf.data_ptr())
        stride, padding, dilation = self.stride, self.padding, self.dilation

        def run(t, idx):
            if not t.is_contiguous():
                t = t.contiguous()
            if prepare(spec, t.data_ptr(), None if idx is None else idx.data_ptr(), k_in, hw, 1, *ptrs):
                return self._skip_torch(t, idx, _conv_native)   # a NaN saliency: torch's topk semantics
            return conv(t, w, b, stride, padding, dilation, 1), idx_out
        return run

    def _dense_kernel(self, t: torch.Tensor, conv) -> Callable:
        """The full conv over the full-width input, then gt_epilogue keeps (and scales) the winners."""
        k_in, hw = t.shape[1], t.shape[2] * t.shape[3]
        prepare, epilogue, spec = self.lib.gt_prepare, self.lib.gt_epilogue, self._spec_ref
        idx_ptr, s_ptr = self._idx_buf.data_ptr(), self._s_buf.data_ptr()
        idx_out = None if self.k == self.c_out else self._idx_buf
        copy_only = self.k == self.c_out and not self.scaled   # mse at density 1: z is the output
        c_in, k, weight, shift = self.c_in, self.k, self.weight, self.shift
        stride, padding, dilation = self.stride, self.padding, self.dilation

        def run(t, idx):
            if not t.is_contiguous():
                t = t.contiguous()
            if prepare(spec, t.data_ptr(), None if idx is None else idx.data_ptr(), k_in, hw, 0, 0, 0, idx_ptr, s_ptr):
                return self._skip_torch(t, idx, _conv_native)
            z = conv(expand(t, idx, c_in), weight, shift, stride, padding, dilation, 1)
            if copy_only:
                return z, None
            out = z.new_empty(1, k, z.shape[2], z.shape[3])
            epilogue(spec, z.data_ptr(), z.shape[2] * z.shape[3], idx_ptr, s_ptr, out.data_ptr())
            return out, idx_out
        return run

    # -- torch-op variants (any device and dtype, depthwise, any batch) --------------------------------
    def _saliency(self, t: torch.Tensor, idx: torch.Tensor | None):
        """(pooled (1, k_in), s (1, C_out)): the masked path's ops on the same values (zeros where t is
        compact), so the same winners. (sum + div_ is how CPU torch computes mean, bit for bit, but 3x
        faster than calling mean here.)"""
        pooled = (t if self.nonneg else t.abs()).sum((2, 3)).div_(t.shape[2] * t.shape[3])
        full = pooled if idx is None else self.zeros_in.index_copy(1, idx, pooled)
        z = scale_free(full)
        if math.isfinite(self.p_clip):   # standardised (built from dense weights); else m 0, a 1: three ops saved
            z = ((z - self.p_mean) * self.p_scale).clamp_(-self.p_clip, self.p_clip)
        return pooled, F.linear(z, self.p_weight, self.p_bias).relu_()

    def _skip_torch(self, t: torch.Tensor, idx: torch.Tensor | None, conv=_conv_native):
        pooled, s = self._saliency(t, idx)
        if self.k == self.c_out:
            out, w, shift, beta = None, self.weight, self.shift, self.beta
        else:
            s, out = s.topk(self.k, dim=1, sorted=False)   # s: the winners' saliencies
            out = out[0]
            w, sb = self.weight.index_select(0, out), self.shift_beta.index_select(0, out)
            shift, beta = sb[:, 0], sb[:, 1]
        if self.depthwise:   # output channel c reads input channel c only
            x = expand(t, idx, self.c_in)
            x = x if out is None else x.index_select(1, out)
            z = conv(x, w, shift, self.stride, self.padding, self.dilation, x.shape[1])
        else:
            if idx is None and self.nonneg:   # a full-width ReLU output (after a residual add, a gate whose
                keep = pooled[0].nonzero()[:, 0]   # consumer needs full width): skip its all-zero channels
                if keep.shape[0] < pooled.shape[1]:
                    keep = keep if keep.shape[0] else keep.new_zeros(1)
                    t, idx = t.index_select(1, keep), keep
            if idx is not None:
                w = w.index_select(1, idx)
            if self.scaled and w[0].numel() < t.shape[2] * t.shape[3]:
                # s * (conv(t, w) + shift) + beta, with s folded into the (smaller) weight
                w = w.mul_(s.view(-1, 1, 1, 1)) if w is not self.weight else w * s.view(-1, 1, 1, 1)
                return conv(t, w, torch.addcmul(beta, s[0], shift), self.stride, self.padding,
                            self.dilation, 1), out
            z = conv(t, w, shift, self.stride, self.padding, self.dilation, 1)
        if not self.scaled:
            return z, out
        return torch.addcmul(beta.view(1, -1, 1, 1), z, s.view(1, -1, 1, 1)), out   # s * (z + shift) + beta

    def _dense_torch(self, t: torch.Tensor, idx: torch.Tensor | None, conv=_conv_native):
        """Every output channel over the full-width input, then the winners kept (and scaled)."""
        _, s = self._saliency(t, idx)
        x = expand(t, idx, self.c_in)
        z = conv(x, self.weight, self.shift, self.stride, self.padding, self.dilation,
                 self.c_in if self.depthwise else 1)
        out, beta = None, self.beta
        if self.k < self.c_out:
            s, out = s.topk(self.k, dim=1, sorted=False)
            out = out[0]
            z, beta = z.index_select(1, out), self.beta.index_select(0, out)
        if not self.scaled:
            return z, out
        return torch.addcmul(beta.view(1, -1, 1, 1), z, s.view(1, -1, 1, 1)), out
