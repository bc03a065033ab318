// The schemas of the GE2E ops, shared by their registration (ge2e_ops.cpp)
// and the CPU emulation of the CUDA kernels (tests/cuda_emulation), which
// registers the kernel ops under another namespace.
//
// ge2e_loss is the op users reach (through ge2e_ext.ge2e_loss): it carries
// the autograd (autograd/ge2e_autograd.cpp) and calls the three kernel ops,
// which every device implements (cpu/, cuda/).
#pragma once

namespace ge2e {

// The GE2E loss of embeddings (N, M, D), or (B, D) grouped by speaker with
// speaker_offsets (N + 1,) (speaker j's rows are [offsets[j], offsets[j + 1])),
// scored against the speaker sums (K, D) (sums=None: the embeddings' own,
// K = N), local speaker j being row speaker_offset + j of the sums: the
// per-utterance losses ((N, M) or (B,)), or, with reduce, scale times their
// sum; and the rows' top1 (bool, (N, M) or (B,)): whether each row's own
// speaker is the most similar (the arg-max of its clamped cosines, ties to the
// lower index; false where a cosine is NaN), from the same pass. The loss is
// differentiable in embeddings, sums, w, b; top1 is not differentiable. With
// normalize (every op): the loss of the rows scaled to unit length,
// e / max(|e|, 1e-12) (torch.nn.functional.normalize), and the gradients
// through that (given sums are taken as sums of unit rows). block_speakers
// (tests): 0 sizes the blocks from the memory budget, > 0 asks for blocks of that many
// whole speakers, < 0 for blocks of -block_speakers rows (which may split a
// speaker across blocks).
inline constexpr const char* kLossSchema =
    "ge2e_loss(Tensor embeddings, Tensor? sums, Tensor w, Tensor b, int speaker_offset, "
    "str loss_method, float? min_cosine, bool reduce, float scale, int block_speakers=0, "
    "Tensor? speaker_offsets=None, bool normalize=False) -> (Tensor, Tensor)";

// The per-utterance losses, (N, M) or (B,), each row's saved state, shaped
// (..., 2) float64: what the method's gradient is taken from (softmax: the
// row's largest difference and its log-normaliser; contrast: the hardest
// impostor, the arg-max speaker k != own), and the rows' top1 (as ge2e_loss's).
// The backward reads the state, never the losses, so a caller may change the
// returned losses in place.
inline constexpr const char* kForwardSchema =
    "ge2e_forward(Tensor embeddings, Tensor? sums, Tensor w, Tensor b, int speaker_offset, "
    "str loss_method, float? min_cosine, int block_speakers=0, Tensor? speaker_offsets=None, "
    "bool normalize=False) -> (Tensor, Tensor, Tensor)";

// The gradients (embeddings, sums, w, b) for the upstream gradient of the
// losses, given the forward's state; the cosines are recomputed. When sums are
// not given, their gradient is already folded into the embeddings' (the second
// output is then scratch).
inline constexpr const char* kBackwardSchema =
    "ge2e_backward(Tensor grad_loss, Tensor embeddings, Tensor? sums, Tensor w, Tensor b, "
    "Tensor state, int speaker_offset, str loss_method, float? min_cosine, "
    "int block_speakers=0, Tensor? speaker_offsets=None, bool normalize=False) "
    "-> (Tensor, Tensor, Tensor, Tensor)";

// scale times the sum of the losses (0-dim), the rows' top1 and the loss's
// gradients (embeddings, sums, w, b), in one sweep: what a training step with
// reduction "sum" or "mean" needs.
inline constexpr const char* kForwardBackwardSchema =
    "ge2e_forward_backward(Tensor embeddings, Tensor? sums, Tensor w, Tensor b, "
    "int speaker_offset, str loss_method, float? min_cosine, float scale, "
    "int block_speakers=0, Tensor? speaker_offsets=None, bool normalize=False) "
    "-> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)";

}  // namespace ge2e
