// The schemas of the GE2E ops, shared by their registration (ge2e_op.cpp) and
// the CPU emulation of the CUDA kernels (tests/cuda_emulation), which registers
// the same signatures under another namespace.
#pragma once

namespace ge2e {

// Per-utterance GE2E losses of embeddings (N, M, D) scored against the speaker
// sums (K, D) (sums=None: the embeddings' own, K = N). Returns the losses
// (N, M) and what the backward needs instead of the N x M x K similarities:
// the row log-sum-exp (softmax) or hardest-impostor similarity (contrast),
// and the hardest impostor's index (contrast; -1 for softmax).
inline constexpr const char* kForwardSchema =
    "ge2e_forward(Tensor embeddings, Tensor? sums, Tensor w, Tensor b, int speaker_offset, "
    "str loss_method, float? min_cosine, int block_speakers=0) -> (Tensor, Tensor, Tensor)";

// Gradients for embeddings, sums (already folded into the embeddings'
// gradient when sums=None), w and b; recomputes the cosines.
inline constexpr const char* kBackwardSchema =
    "ge2e_backward(Tensor grad_loss, Tensor embeddings, Tensor? sums, Tensor w, Tensor b, "
    "Tensor row_stat, Tensor hardest, int speaker_offset, str loss_method, float? min_cosine, "
    "int block_speakers=0) -> (Tensor, Tensor, Tensor, Tensor)";

}  // namespace ge2e
