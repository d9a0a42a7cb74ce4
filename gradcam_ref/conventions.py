r"""Conventions: the post-processing each Grad-CAM library applies, written down and reproducible.

Libraries agree on Eq. 1 and Eq. 2 of Selvaraju et al. and still return different heatmaps for
the same model, layer, input and target, because each one post-processes the map its own way:
ReLU or not, which normalisation (and which epsilon), normalise before or after resizing, which
resize kernel. A :class:`Convention` records one library's choices as an ordered tuple of steps
applied to the *signed* map :math:`M^c = \sum_k \alpha_k^c A^k` (Eq. 2 before its ReLU), and
the reasons, in words, why its maps differ from the paper's. :func:`postprocess` runs the steps;
:meth:`gradcam_ref.Explanation.heatmap` calls it; ``gradcam-ref verify --explain LIB`` prints
:func:`describe`, which reads the same records. There is one place for each fact.

The conventions are :data:`CONVENTIONS` (``"paper"``, ``"pytorch-grad-cam"``, ``"captum"``,
``"torchcam"``, ``"tf-keras-vis"``, ``"xplique"``); each one's steps and reasons are in its record, in words in
docs/conventions.md.

Maps are channels-first arrays ``(N, *spatial)`` or ``(N, T, *spatial)`` of any library the
core accepts; the result keeps the library, dtype and device. Peers' output *layouts* are not
reproduced (captum's channel axis of 1, pytorch-grad-cam's NumPy float32): each convention's
``returns`` says what the peer returns, so a caller knows what to squeeze or cast.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

from gradcam_ref._arrays import Array, as_float_arrays, check_finite, check_spatial_rank, quiet_numpy, shape_of
from gradcam_ref._postprocess import normalize
from gradcam_ref._resample import KERNELS, parse_size, resize

__all__ = [
    "CONVENTIONS", "Convention", "MinMax", "Relu", "Resize", "describe", "get_convention",
    "method_signed_map", "postprocess",
]

REASONS: dict[int, str] = {
    1: "final ReLU on or off",
    2: "logit or softmax score",
    3: "default target (argmax or required)",
    4: "mean or sum pooling of the gradients",
    5: "normalisation (min-max with different eps, max only, none)",
    6: "normalise then resize, or resize then normalise",
    7: "resize kernel and pixel alignment",
    8: "layer output or input, before or after the activation",
    9: "fusion of several layers",
    10: "batch coupling (targets truncated, statistics over the batch)",
    11: "channels-first or channels-last layout",
    12: "randomness in smoothing",
    13: "post-processing for display (squared masks, rescaling)",
}
"""The thirteen reasons two Grad-CAM libraries disagree on the same model, layer and input."""


# --- steps ---------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Relu:
    """:math:`\\max(x, 0)`."""

    def describe(self) -> str:
        return "ReLU: negative values become 0"

    def __call__(self, xp: Any, x: Array, size: tuple[int, ...] | None, rank: int) -> Array:
        return xp.where(x > 0, x, xp.zeros_like(x))


@dataclasses.dataclass(frozen=True)
class MinMax:
    r"""Per-map min-max over the spatial axes.

    ``eps=None``: :math:`(x - \min x) / (\max x - \min x)`, a flat map becomes zeros (the
    core's :func:`gradcam_ref.normalize`). With ``eps``: :math:`y = x - \min x`, then
    :math:`y / (\max y + \varepsilon)`, as the peers write it; the maximum is then
    :math:`1 - \varepsilon / (\max y + \varepsilon)`, not 1, and a flat map becomes zeros.
    """

    eps: float | None = None

    def describe(self) -> str:
        if self.eps is None:
            return "min-max: (x - min) / (max - min) per map, exactly [0, 1] (a flat map becomes 0)"
        return f"min-max with eps: (x - min) / (max - min + {self.eps:g}) per map"

    def __call__(self, xp: Any, x: Array, size: tuple[int, ...] | None, rank: int) -> Array:
        axes = tuple(range(x.ndim - rank, x.ndim))
        if self.eps is None:
            return normalize(x, "minmax", axis=axes)
        shifted = x - xp.min(x, axis=axes, keepdims=True)
        return shifted / (xp.max(shifted, axis=axes, keepdims=True) + self.eps)


@dataclasses.dataclass(frozen=True)
class Resize:
    r"""Resize the spatial axes to ``size`` (nothing when ``size`` is None).

    The kernels (``"linear-half-pixel"``, ``"linear-corner"``, ``"nearest-floor"``) are those of
    ``gradcam_ref._resample.source_positions``: the one resampling engine.

    Attributes:
      kernel: one of :data:`KERNELS`.
      by: the function the library calls, in words.
      ranks: the spatial ranks the library can resize.
    """

    kernel: str
    by: str
    ranks: tuple[int, ...] = (1, 2, 3)

    def __post_init__(self) -> None:
        if self.kernel not in KERNELS:
            raise ValueError(f"kernel must be one of {KERNELS}, got {self.kernel!r}")

    def describe(self) -> str:
        words = {
            "linear-half-pixel": "bilinear with half-pixel centres ([0, 1] doubled: [0, .25, .75, 1])",
            "linear-corner": "linear with aligned corners ([0, 1] doubled: [0, 1/3, 2/3, 1])",
            "nearest-floor": "nearest neighbour, output i copies input floor(i * n_in / n_out)",
            "cubic-tf": "bicubic (Keys, a = -0.5) with half-pixel centres, TensorFlow's table of 1/1024 "
                        "fractions and edge taps dropped; it overshoots (values below 0 and above the max)",
        }[self.kernel]
        return f"resize to the requested size: {words}, by {self.by}"

    def __call__(self, xp: Any, x: Array, size: tuple[int, ...] | None, rank: int) -> Array:
        if size is None:
            return x
        if rank not in self.ranks:
            raise ValueError(
                f"this convention resizes {' or '.join(f'{r}-D' for r in self.ranks)} maps only "
                f"({self.by}), got {rank}-D maps of shape {shape_of(x)}: pass size=None"
            )
        return resize(xp, x, size, self.kernel)


Step = Relu | MinMax | Resize



# --- conventions ---------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Convention:
    """One library's way from the signed Grad-CAM map to the heatmap it returns.

    Attributes:
      name: the convention's name, as passed to :meth:`gradcam_ref.Explanation.heatmap`.
      library: the library and the version whose code this reproduces.
      call: the call of the library that this convention reproduces.
      steps: applied in order to the signed map :math:`\\sum_k \\alpha_k^c A^k`.
      returns: what the library returns (layout, dtype), where it differs from ours.
      differences: ``(reason, words)`` pairs: why its maps differ from the paper's, with the
        number of the reason in :data:`REASONS`.
      checked: how the test suite checks that this convention reproduces the library.
      aliases: other names accepted for it.
      methods: the CAM methods the library implements (names of :data:`gradcam_ref.METHODS`),
        each with the options of the core function that reproduce the library's variant
        (e.g. pytorch-grad-cam's XGrad-CAM: ``{"eps": 1e-7}``); ``steps`` are applied to the
        signed map of that variant.
      method_differences: ``method -> ((reason, words), ...)``: how the library's variant of a
        method departs from the method's paper.
      method_steps: ``method -> steps`` for the methods the library post-processes otherwise
        than ``steps`` (e.g. xplique's FEM: no ReLU).
    """

    name: str
    library: str
    call: str
    steps: tuple[Step, ...]
    returns: str
    differences: tuple[tuple[int, str], ...]
    checked: str
    aliases: tuple[str, ...] = ()
    methods: dict[str, dict[str, Any]] = dataclasses.field(default_factory=lambda: {"grad-cam": {}})
    method_differences: dict[str, tuple[tuple[int, str], ...]] = dataclasses.field(default_factory=dict)
    method_steps: dict[str, tuple[Step, ...]] = dataclasses.field(default_factory=dict)

    @property
    def resizes(self) -> bool:
        """Whether the library resizes the map (else it stays at the layer's resolution)."""
        return any(isinstance(step, Resize) for step in self.steps)

    def steps_for(self, method: str | None) -> tuple[Step, ...]:
        """The steps applied to ``method``'s signed map (``steps`` unless ``method_steps`` has its own)."""
        return self.method_steps.get(method, self.steps) if method is not None else self.steps


PAPER = Convention(
    name="paper",
    library="Selvaraju et al., Grad-CAM (ICCV 2017, IJCV 2020)",
    call="gradcam_ref: Explanation.heatmap(size, convention='paper')",
    steps=(
        Relu(),
        Resize("linear-half-pixel", by="gradcam_ref.upsample (= torch F.interpolate align_corners=False)"),
        MinMax(),
    ),
    returns="the explanation's arrays: (N, *size) or (N, T, *size), same library, dtype and device",
    differences=(),
    checked="hand-computed goldens; upsample against torch and jax.image.resize",
    aliases=("gradcam-ref", "gradcam_ref", "selvaraju"),
    methods={
        "grad-cam": {}, "grad-cam++": {"eps": 0.0}, "hirescam": {}, "xgrad-cam": {"eps": 0.0}, "layercam": {},
        "eigen-cam": {"centre": False, "sign": "fixed"}, "eigen-grad-cam": {"centre": False, "sign": "fixed"},
        "smooth-grad-cam++": {"variant": "paper"}, "score-cam": {"variant": "paper"}, "ablation-cam": {"value": "zero"},
        "fem": {},
    },
)

PYTORCH_GRAD_CAM = Convention(
    name="pytorch-grad-cam",
    library="pytorch-grad-cam 1.5.7 (pip: grad-cam)",
    call="pytorch_grad_cam.GradCAM(model, target_layers=[layer])(x, targets), size = x's (H, W)",
    steps=(
        Relu(),
        MinMax(eps=1e-7),
        Resize("linear-half-pixel", by="cv2.resize INTER_LINEAR on float32", ranks=(2,)),
        Relu(),
        MinMax(eps=1e-7),
    ),
    returns="NumPy float32 (N, H, W), always at the input's size",
    differences=(
        (5, "it normalises with (x - min) / (max - min + 1e-7), in float32: the top value is "
            "just below 1"),
        (6, "it normalises at the layer's resolution, resizes, then normalises the resized map "
            "again (scale_cam_image runs twice); resizing is linear, so the second pass undoes "
            "the order of the first, and for one layer its map equals the paper convention's to "
            "float32 precision"),
        (7, "cv2.resize INTER_LINEAR has half-pixel centres like the paper convention, but runs "
            "in float32; for 3-D volumes it uses scipy.ndimage.zoom with cubic splines (order 3), "
            "which this convention does not reproduce (it refuses to resize 3-D maps)"),
        (8, "with an in-place operation right after the layer (e.g. ReLU(inplace=True)) it reads "
            "A after that operation changed it but dA from before it, so the map mixes two layers; "
            "this convention does not reproduce that (its map is then this convention applied to "
            "ReLU(A) with the layer's weights)"),
        (9, "with several target layers it averages the layers' maps after its first ReLU, min-max and "
            "resize, then applies ReLU and min-max to the mean (docs/conventions.md has the recipe)"),
        (10, "targets are zipped with the batch: a target list shorter than the batch silently "
             "drops the remaining examples"),
        (12, "aug_smooth (test-time augmentation) and eigen_smooth (first SVD component, whose "
             "sign is arbitrary) replace the map; both are off by default"),
    ),
    checked="against pytorch_grad_cam.GradCAM itself on small CNNs and a random-init resnet18; "
            "each method below against its pytorch_grad_cam class the same way",
    aliases=("grad-cam", "pgc", "pytorch_grad_cam"),
    methods={
        "grad-cam": {}, "grad-cam++": {"eps": 1e-6}, "hirescam": {}, "xgrad-cam": {"eps": 1e-7}, "layercam": {},
        "eigen-cam": {"centre": True, "sign": "numpy"}, "eigen-grad-cam": {"centre": True, "sign": "numpy"},
        "score-cam": {"variant": "pytorch-grad-cam"}, "ablation-cam": {"value": "pytorch-grad-cam"},
    },
    method_differences={
        "grad-cam++": ((5, "GradCAMPlusPlus adds 1e-6 to the denominator of a_ij, which is not small "
                           "next to g^2 when the gradients are below about 1e-3 (the weights then "
                           "shrink towards 0)"),),
        "xgrad-cam": ((5, "XGradCAM adds 1e-7 to sum A in the weights' denominator: a channel whose "
                          "activations sum to 0 gets sum(GA) / 1e-7 instead of no weight"),),
        "layercam": ((9, "several layers are fused as its Grad-CAM fuses them (the mean of their "
                         "once-normalised maps, normalised again), without the paper's tanh scaling "
                         "of shallow layers"),),
        "eigen-cam": ((12, "EigenCAM centres the activations (a PCA, not the paper's SVD of A) and keeps "
                           "the SVD's arbitrary sign, so its final ReLU can erase the object; the "
                           "convention reproduces both (the sign is np.linalg.svd's in the activations' dtype)"),),
        "eigen-grad-cam": ((12, "EigenGradCAM: EigenCAM's centring and arbitrary sign, on G * A"),),
        "score-cam": ((7, "ScoreCAM upsamples A with aligned corners (UpsamplingBilinear2d) and "
                          "normalises each mask with (x - min) / (max - min + 1e-8); no baseline "
                          "(a softmax cannot see it); batches of 16 masked inputs per image"),),
        "ablation-cam": ((5, "AblationCAM sets a channel to 0 only when the example's smallest "
                             "activation is 0; otherwise to min - 1e7, lowered by another 1e7 for "
                             "each row of its batch of 32 (its AblationLayer re-reads the minimum), "
                             "and it reruns the whole network for every ablation"),
                         (8, "on a ViT its AblationLayerVit ablates the channel in every token, the "
                             "class token included; explain(reshape=grid) ablates the grid's tokens "
                             "and leaves the class token as it was, so on a ViT the maps differ (up "
                             "to the whole range); this convention does not reproduce that"),),
    },
)

CAPTUM = Convention(
    name="captum",
    library="captum 0.9.0",
    call="LayerAttribution.interpolate(LayerGradCam(model, layer).attribute(x, target), size)",
    steps=(Resize("nearest-floor", by="F.interpolate(mode='nearest'), LayerAttribution.interpolate's default"),),
    returns="a torch tensor (N, 1, *size): the channel axis of 1 is kept",
    differences=(
        (1, "no ReLU by default (relu_attributions=False): negative evidence stays in the map"),
        (5, "no normalisation: values keep the units of the score times the activations"),
        (7, "LayerAttribution.interpolate defaults to nearest-neighbour: output pixel i copies "
            "layer cell floor(i * n_in / n_out), so the heatmap is made of flat blocks instead of "
            "a bilinear ramp; for non-integer factors torch's 'nearest' takes the cell under the "
            "pixel's top-left corner, not the one under its centre ('nearest-exact')"),
        (3, "a target is required for (N, C) outputs (target=None raises an assertion)"),
        (2, "the score is whatever forward returns at the target: logits for a plain "
            "classifier, probabilities if the model ends with a softmax"),
    ),
    checked="against captum's LayerGradCam and LayerAttribution.interpolate on small CNNs and a "
            "random-init resnet18",
)

TORCHCAM = Convention(
    name="torchcam",
    library="torchcam 0.5.0",
    call="torchcam.methods.GradCAM(model, layer)(class_idx, scores), normalized=True (default)",
    steps=(Relu(), MinMax(eps=1e-8)),
    returns="a list (one per target layer) of torch tensors (N, *spatial) at the layer's resolution",
    differences=(
        (5, "it normalises with (x - min) / (max - min + 1e-8), once: a map whose largest "
            "value M is small tops out at M / (M + 1e-8), visibly below 1 when M is near 1e-8"),
        (7, "it returns the map at the layer's resolution (size must be None or that shape); "
            "its overlay_mask helper resizes with PIL bicubic, which can overshoot"),
        (13, "overlay_mask squares the mask before colouring it, which darkens mid values"),
        (3, "class_idx is required: there is no default target"),
        (8, "with an in-place operation right after the layer (e.g. ReLU(inplace=True)) it "
            "explains that operation's output instead (A and dA both taken after it); name that "
            "module as the layer to get the same map here"),
        (9, "fuse_cams combines several layers by an elementwise maximum after bilinear resizing"),
    ),
    checked="against torchcam.methods.GradCAM on small CNNs and a random-init resnet18; "
            "XGradCAM, LayerCAM and ScoreCAM the same way",
    methods={"grad-cam": {}, "grad-cam++": {"variant": "torchcam"}, "xgrad-cam": {"eps": 1e-8}, "layercam": {},
             "score-cam": {"variant": "torchcam"}, "smooth-grad-cam++": {"variant": "torchcam"}},
    method_differences={
        "grad-cam++": ((4, "GradCAMpp divides its alpha in place through a boolean index, which copies, so "
                           "the division is lost: its weights are sum ReLU(g)^3, not Eq. 19's "
                           "(explain(..., variant='torchcam'))"),),
        "xgrad-cam": ((5, "XGradCAM adds 1e-8 to sum A in the weights' denominator"),),
        "layercam": ((9, "fuse_cams applies tanh(2 x) to every layer's normalised map, then takes "
                         "the elementwise maximum after bilinear resizing (fuse_maps rule 'torchcam')"),),
        "score-cam": ((6, "ScoreCAM min-max normalises A (eps 1e-8) at the layer's resolution, then "
                          "upsamples (half-pixel); the unmasked input's score is subtracted, which "
                          "the softmax over channels cannot see; chunks of 32 masked inputs"),),
        "smooth-grad-cam++": ((12, "SmoothGradCAMpp draws its noise from torch's global generator "
                                   "(Normal(0, std).sample per sample: seed torch and pass the same draws "
                                   "as noise=); its weights pair A with the averaged third derivative "
                                   "position by position, take the ReLU of the last sample's gradient, and "
                                   "its map weights the last noisy forward's activations "
                                   "(explain(..., variant='torchcam'))"),),
    },
)

TF_KERAS_VIS = Convention(
    name="tf-keras-vis",
    library="tf-keras-vis 0.8.7 (Keras 3, TensorFlow 2.21)",
    call="tf_keras_vis.gradcam.Gradcam(model, clone=False)(CategoricalScore(targets), x, "
         "penultimate_layer=name), expand_cam=True and normalize_cam=True (defaults)",
    steps=(
        Relu(),
        Resize("linear-corner", by="scipy.ndimage.zoom(order=1)"),
        MinMax(eps=1e-7),
    ),
    returns="NumPy (N, *size) of the model's dtype, channels-last models",
    differences=(
        (8, "penultimate_layer names a hint, not the tensor: with seek_penultimate_conv_layer=True "
            "(the default) find_layer walks model.layers backwards from the named layer and takes "
            "the first convolution (the named layer itself only if it is one), so "
            "penultimate_layer='relu1' explains conv1's output, before its ReLU; explain here at "
            "the layer it resolves to (verify names it in each check)"),
        (7, "it resizes with scipy.ndimage.zoom(order=1): linear with aligned corners, so "
            "[0, 1] doubled gives [0, 1/3, 2/3, 1] instead of [0, .25, .75, 1]; the heatmap is "
            "stretched towards the borders by up to half a layer cell"),
        (5, "it normalises with (x - min) / (max - min + K.epsilon()), epsilon 1e-7"),
        (2, "the score is a user function, usually of the softmax output unless the model's "
            "last activation is replaced by a linear one (ReplaceToLinear); to reproduce a "
            "softmax score pass a callable target returning softmax(scores)[:, c]"),
        (11, "models and inputs are channels-last (NHWC); the map is the same"),
    ),
    checked="against tf_keras_vis.gradcam.Gradcam itself (gradcam-ref verify, in a TensorFlow "
            "subprocess) on Keras twins of the verify nets, at the layer its find_layer resolves; "
            "Layercam, GradcamPlusPlus and Scorecam the same way",
    aliases=("tf_keras_vis", "keras-vis"),
    methods={"grad-cam": {}, "grad-cam++": {"variant": "tf-keras-vis"}, "layercam": {},
             "score-cam": {"variant": "tf-keras-vis"}},
    method_differences={
        "grad-cam++": ((2, "GradcamPlusPlus keeps the factor exp(score) of the paper's Y = exp(S) in "
                           "the weights (seen only through the 1e-7 of its min-max); where exp(score) "
                           "overflows (a float32 logit above 88.7) its maps are NaN"),
                       (5, "it divides each channel's alphas by their spatial sum, which changes the "
                           "map's shape; where 2 + sum(A) g = 0 it divides by 0 (NaN maps); "
                           "explain(..., method='grad-cam++', variant='tf-keras-vis')")),
        "layercam": ((8, "Layercam is LayerCAM at the convolution find_layer resolves, one layer "
                         "(no fusion), then the steps above"),),
        "score-cam": ((2, "Scorecam weights each channel by softmax(model(x * mask))[c], the class "
                          "probability itself, not a softmax over channels, and applies that softmax "
                          "to the model's output even when the model ends with one; channels whose "
                          "mask is flat score the all-zero input"),
                      (7, "its masks: scipy.ndimage.zoom(order=1) (aligned corners), then "
                          "(x - min) / (max - min + 1e-7); model.predict in batches of batch_size (32)"),
                      (10, "max_N (Faster-ScoreCAM) keeps the union over the batch of each example's "
                           "max_N channels of largest spatial standard deviation, so one example's map "
                           "depends on the others (explain(..., max_n=) does the same); it fails on "
                           "float64 models (verify notes why)")),
    },
)

XPLIQUE = Convention(
    name="xplique",
    library="xplique 2.0.2 (Keras 3, TensorFlow 2.21)",
    call="xplique.attributions.GradCAM(model, conv_layer=name).explain(x, one_hot(targets))",
    steps=(
        Relu(),
        Resize("cubic-tf", by="tf.image.resize(method='bicubic')", ranks=(2,)),
    ),
    returns="a tf.Tensor (N, H, W, 1) float32: a trailing channel axis of 1, always at the input's size",
    differences=(
        (7, "it resizes with tf.image.resize(method='bicubic'): Keys' cubic kernel overshoots, so "
            "the heatmap has negative values next to strong peaks and exceeds the layer's maximum"),
        (5, "no normalisation: values keep the units of the score times the activations"),
        (2, "the score is the model's output times the one-hot target (logits for a plain "
            "classifier; output_layer= picks another layer's output)"),
        (3, "targets are required, one-hot (N, C)"),
        (8, "without conv_layer it takes the last layer that has a `filters` attribute (a "
            "convolution's output, before any separate activation layer)"),
        (10, "inputs are cast to float32 and processed in batches of batch_size (32)"),
        (11, "models and inputs are channels-last (NHWC); the map is the same"),
    ),
    checked="against xplique.attributions.GradCAM itself (gradcam-ref verify, in a TensorFlow "
            "subprocess) on Keras twins of the verify nets; GradCAMPP and FEM the same way",
    methods={"grad-cam": {}, "fem": {}},
    method_differences={
        "fem": ((1, "FEM returns sum_l mu_l B_l without a final ReLU: a layer whose channel means are "
                    "negative (a convolution before its activation) gives negative values, which it "
                    "keeps; then the bicubic resize"),
                (3, "class-agnostic: targets are not used")),
    },
    method_steps={"fem": (Resize("cubic-tf", by="tf.image.resize(method='bicubic')", ranks=(2,)),)},
)

CONVENTIONS: dict[str, Convention] = {
    c.name: c for c in (PAPER, PYTORCH_GRAD_CAM, CAPTUM, TORCHCAM, TF_KERAS_VIS, XPLIQUE)
}
"""Every convention by name."""


def get_convention(name: str | Convention) -> Convention:
    """The convention called ``name`` (or one of its aliases, any case)."""
    if isinstance(name, Convention):
        return name
    if not isinstance(name, str):
        raise TypeError(f"convention must be a name (str), got {type(name).__name__}")
    key = name.strip().lower()
    for convention in CONVENTIONS.values():
        if key == convention.name or key in convention.aliases:
            return convention
    raise ValueError(f"convention must be one of {sorted(CONVENTIONS)}, got {name!r}")


@quiet_numpy
def postprocess(
    signed_maps: Array,
    convention: str | Convention = "paper",
    *,
    size: int | Sequence[int] | None = None,
    spatial_rank: int | None = None,
    method: str | None = None,
) -> Array:
    r"""The heatmap that ``convention``'s library returns, from the signed Grad-CAM map.

    ``signed_maps`` is :math:`M^c = \sum_k \alpha_k^c A^k` before the ReLU of Eq. 2
    (``gradcam_ref.cam(activations, weights)``); the convention's steps run on it in order.

    Args:
      signed_maps: ``(N, *spatial)``, or ``(N, T, *spatial)`` with ``spatial_rank`` given.
      convention: a name in :data:`CONVENTIONS` (or an alias), or a :class:`Convention`.
      size: the output's spatial shape (an int for every axis), e.g. the input's ``(H, W)``;
        None keeps the layer's resolution (the libraries that resize are then not resizing).
      spatial_rank: how many trailing axes are spatial; default all but the first.
      method: the CAM method whose map this is, for a library that post-processes some methods
        otherwise (:meth:`Convention.steps_for`); None: the convention's ``steps``.

    Returns:
      The heatmap, ``signed_maps.shape[:-spatial_rank] + size``, same library and dtype.

    Example:
      >>> import numpy as np
      >>> m = np.array([[-1.0, 1.0]])  # one 1-D map of 2 positions
      >>> postprocess(m, "paper", size=4)
      array([[0.  , 0.25, 0.75, 1.  ]])
      >>> postprocess(m, "tf-keras-vis", size=4).round(6)
      array([[0.      , 0.333333, 0.666667, 1.      ]])
      >>> postprocess(m, "captum", size=4)
      array([[-1., -1.,  1.,  1.]])
    """
    chosen = get_convention(convention)
    if method is not None and not isinstance(method, str):
        raise TypeError(f"method must be None or a method name (str), got {' '.join(repr(method).split())}")
    xp, (x,) = as_float_arrays(signed_maps=signed_maps)
    shape = shape_of(x)
    if len(shape) < 2:
        raise ValueError(
            f"signed_maps must have shape (N, *spatial) with at least one spatial axis, got shape {shape}"
        )
    rank = check_spatial_rank(spatial_rank, shape, "signed_maps")
    if 0 in shape:
        raise ValueError(f"signed_maps must not be empty, got shape {shape}")
    spatial = shape[len(shape) - rank:]
    target = _as_size(size, rank, spatial)
    if target is not None and not chosen.resizes and target != spatial:
        raise ValueError(
            f"the {chosen.name!r} convention keeps the layer's resolution {spatial} ({chosen.library} "
            f"does not resize its maps), got size={size!r}: pass size=None"
        )
    check_finite(x, f"the {chosen.name!r} convention", signed_maps=x)  # before a ReLU turns NaN into 0
    for step in chosen.steps_for(method):
        x = step(xp, x, target, int(rank))
    check_finite(x, f"the {chosen.name!r} convention", signed_maps=signed_maps)
    return x


def _as_size(size: int | Sequence[int] | None, rank: int, spatial: tuple[int, ...]) -> tuple[int, ...] | None:
    return None if size is None else parse_size(size, rank, spatial=spatial, optional=True)


def method_signed_map(explanation: Any, convention: str | Convention) -> Array:
    """The signed map of ``explanation``'s method under ``convention``'s variant of that method.

    Gradient methods are recomputed from the explanation's ``(A, G)`` with the library's
    options; perturbation methods and Smooth Grad-CAM++ were fixed at ``explain`` time, so
    their options must already be the library's.
    """
    from gradcam_ref._explain import method_target_scores
    from gradcam_ref._methods import GRADIENT_METHODS, method_fields

    c = get_convention(convention)
    method = explanation.method
    if method not in c.methods:
        having = sorted(name for name, conv in CONVENTIONS.items() if method in conv.methods)
        raise ValueError(
            f"{c.library} has no {method!r} that this convention reproduces: convention must be one of "
            f"{having} for it")
    wanted = c.methods[method]
    given = dict(explanation.options)
    if method in GRADIENT_METHODS and method != "smooth-grad-cam++":
        if all(given.get(k) == v for k, v in wanted.items()) and explanation.signed is not None:
            return explanation.signed
        y = method_target_scores(method, wanted, explanation.scores, explanation.targets)
        return method_fields(method, explanation.activations, explanation.gradients, target_scores=y,
                             **wanted).signed
    defaults = PAPER.methods[method]
    mismatch = {k: v for k, v in wanted.items() if given.get(k, defaults.get(k)) != v}
    if mismatch:
        hint = ", ".join(f"{k}={v!r}" for k, v in mismatch.items())
        raise ValueError(
            f"this {method} explanation was computed with {given or 'the paper defaults'}; the "
            f"{c.name!r} convention needs explain(..., method={method!r}, {hint})")
    return explanation.signed


def describe(name: str | Convention) -> str:
    """In plain words: what ``name``'s library does to the map, and why it differs from the paper's.

    This is what ``gradcam-ref verify --explain LIB`` prints; it reads the :class:`Convention`
    records that :func:`postprocess` runs, so the words and the numbers cannot drift apart.
    """
    c = get_convention(name)
    lines = [f"{c.name}: {c.library}", f"  reproduces: {c.call}", f"  returns:    {c.returns}", ""]
    shown = [("its steps", c)] if c is PAPER else [("its steps", c), ("the paper's steps", PAPER)]
    for label, convention in shown:
        lines.append(f"  {label}, in order:")
        lines += [f"    {i}. {step.describe()}" for i, step in enumerate(convention.steps, 1)]
    lines.append("")
    if not c.differences:
        lines.append("  This is the reference convention: every other one is described against it.")
    else:
        lines.append("  Why its maps differ from the paper's:")
        for reason, words in c.differences:
            lines.append(f"    - {words} [reason {reason}: {REASONS[reason]}]")
    for method, differences in c.method_differences.items():
        lines.append(f"  {method}:")
        if method in c.method_steps:
            lines.append("    its steps: " + "; ".join(step.describe() for step in c.method_steps[method]))
        for reason, words in differences:
            lines.append(f"    - {words} [reason {reason}: {REASONS[reason]}]")
    if len(c.methods) > 1:
        lines.append(f"  methods it implements: {', '.join(c.methods)}")
    lines += ["", f"  checked: {c.checked}"]
    return "\n".join(lines)

