"""FID (Heusel et al., 2017), Inception Score (Salimans et al., 2016) and precision / recall (Kynkaanniemi et
al., 2019) of a sample batch against a reference batch in ADM's `.npz` format (`mmgen.eval.adm_npz`): the numbers
the field reports for class-conditional ImageNet (50,000 samples against `VIRTUAL_imagenet256_labeled.npz`).

Network and metrics are torch-fidelity's (an optional extra: `pip install 'mmgen[fid]'`): its `inception-v3-compat`
extractor (the 2015-12-05 TensorFlow FID graph ported to torch, TF1-style bilinear resize to 299) gives the pool3
features (2048) and the unbiased logits (1008) in one pass; FID comes from the Gaussian statistics of pool3, IS from
the logits (10 splits), precision / recall from pool3 with k = 3 neighbours (ADM's choice; torch-fidelity's own
default is VGG16). The weights are the file the user names: nothing is ever downloaded. ADM's suite runs the
TensorFlow graph itself, so these torch numbers are close to ADM's, not identical; every report says which
implementation made it.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from mmgen.eval.adm_npz import image_shape, iter_images, npz_arrays, read_array

METRICS = ("fid", "is", "pr")
REFERENCE_STATS = ("auto", "stored", "images")  # where the reference's mu / sigma come from
PR_NEIGHBORHOOD = 3  # k of the k-NN balls (Kynkaanniemi et al.; ADM)
IS_SHUFFLE_SEED = 2020  # torch-fidelity's default: class-ordered batches are shuffled before the splits
EXTRA_HINT = "pip install 'mmgen[fid]' (or: pip install torch-fidelity)"
# what a state dict must hold to be the FID Inception: its first conv and its 1008-way classifier
_INCEPTION_SHAPES = {"Conv2d_1a_3x3.conv.weight": (32, 3, 3, 3), "fc.weight": (1008, 2048), "fc.bias": (1008,)}

# uint8 images (B, 3, H, W) -> (pool features (B, D), logits (B, C))
Extractor = Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


def torch_fidelity():
    """The torch_fidelity module, or an ImportError that names the extra to install."""
    try:
        import torch_fidelity
    except ImportError:
        raise ImportError(f"FID / IS / precision-recall need torch-fidelity, which is not installed: "
                          f"{EXTRA_HINT}") from None
    return torch_fidelity


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def check_inception_weights(path: str | Path) -> Path:
    """The FID Inception weights file, checked before any library opens it: it exists and is a plain tensor state
    dict (`torch.load(weights_only=True)`: no pickled code runs) with the FID Inception's layers."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"--inception-weights {str(path)!r} does not exist; pass the FID Inception weights "
                                f"file (e.g. pt_inception-2015-12-05-6726825d.pth, the file torch-fidelity and "
                                f"torchmetrics load as weights-inception-2015-12-05-6726825d.pth); nothing is "
                                f"downloaded")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 (any unreadable file is the same user error)
        raise ValueError(f"--inception-weights {str(path)!r} is not a torch state dict of tensors "
                         f"({type(e).__name__}: {str(e)[:200]})") from None
    if not isinstance(state, dict):
        raise ValueError(f"--inception-weights {str(path)!r} holds a {type(state).__name__}, not a state dict")
    bad = {k: tuple(state[k].shape) if k in state else None for k, shape in _INCEPTION_SHAPES.items()
           if k not in state or tuple(state[k].shape) != shape}
    if bad:
        raise ValueError(f"--inception-weights {str(path)!r} is not the FID Inception v3 (1008 classes): expected "
                         f"{_INCEPTION_SHAPES}, got {bad}")
    return path


class InceptionFeatures(torch.nn.Module):
    """torch-fidelity's FID Inception on a local weights file: uint8 images (B, 3, H, W) -> (pool3 (B, 2048),
    unbiased logits (B, 1008))."""

    def __init__(self, weights: str | Path):
        super().__init__()
        self.weights = check_inception_weights(weights)
        tf = torch_fidelity()
        from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

        # a path is always given, so the library's download branch is never reached
        try:
            self.net = FeatureExtractorInceptionV3("inception-v3-compat", ["2048", "logits_unbiased"],
                                                   feature_extractor_weights_path=str(self.weights))
        except RuntimeError as e:  # load_state_dict: missing / unexpected keys or shapes
            raise ValueError(f"--inception-weights {str(self.weights)!r} does not fit torch-fidelity's "
                             f"FID Inception: {str(e)[:300]}") from None
        self.description = (f"torch-fidelity {tf.__version__} FeatureExtractorInceptionV3 (inception-v3-compat: "
                            f"TF1-style bilinear resize to 299; pool3 2048-d, unbiased logits 1008-d), FID Inception "
                            f"weights from {self.weights} (sha256 {_sha256(self.weights)[:16]})")

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        pool, logits = self.net(x)
        return pool, logits


@torch.no_grad()
def extract(batches: Iterable[np.ndarray], n: int, extractor: Extractor, device="cpu", progress: bool = True,
            desc: str = "inception") -> tuple[torch.Tensor, torch.Tensor]:
    """Features of n uint8 NHWC images given in batches: (pool (n, D), logits (n, C)), float32 on the CPU."""
    pools, logits = [], []
    with tqdm(total=n, desc=desc, unit="img", disable=not progress) as bar:
        for batch in batches:
            x = torch.from_numpy(np.array(batch)).permute(0, 3, 1, 2).to(device)  # a writable copy
            p, lg = extractor(x)
            pools.append(p.float().cpu())
            logits.append(lg.float().cpu())
            bar.update(len(batch))
    return torch.cat(pools), torch.cat(logits)


def statistics(pool: torch.Tensor) -> dict[str, np.ndarray]:
    """{"mu", "sigma"} of pool features, float64 (torch-fidelity's `fid_features_to_statistics`)."""
    torch_fidelity()
    from torch_fidelity.metric_fid import fid_features_to_statistics

    return {k: np.asarray(v, np.float64) for k, v in fid_features_to_statistics(pool.double()).items()}


def frechet_distance(stats_1: dict[str, np.ndarray], stats_2: dict[str, np.ndarray]) -> float:
    """FID between two Gaussian fits (torch-fidelity's `fid_statistics_to_metric`, float64)."""
    torch_fidelity()
    from torch_fidelity.metric_fid import KEY_METRIC_FID, fid_statistics_to_metric

    s1 = {k: np.asarray(stats_1[k], np.float64) for k in ("mu", "sigma")}
    s2 = {k: np.asarray(stats_2[k], np.float64) for k in ("mu", "sigma")}
    if s1["mu"].shape != s2["mu"].shape or s1["sigma"].shape != s2["sigma"].shape:
        raise ValueError(f"statistics do not match: mu {s1['mu'].shape} vs {s2['mu'].shape}, sigma "
                         f"{s1['sigma'].shape} vs {s2['sigma'].shape} (the reference's mu / sigma must be pool3 "
                         f"statistics of the same Inception)")
    return fid_statistics_to_metric(s1, s2, verbose=False)[KEY_METRIC_FID]


def inception_score(logits: torch.Tensor, splits: int = 10) -> dict[str, float]:
    """IS mean and std over `splits` (torch-fidelity's `isc_features_to_metric`, rows shuffled with its seed 2020
    first, since batches written class by class would otherwise put few classes in each split)."""
    torch_fidelity()
    from torch_fidelity.metric_isc import KEY_METRIC_ISC_MEAN, KEY_METRIC_ISC_STD, isc_features_to_metric

    if isinstance(splits, bool) or not isinstance(splits, int) or not 1 <= splits <= len(logits):
        raise ValueError(f"is_splits (--is-splits) must be an integer in [1, {len(logits)}] (the number of samples), "
                         f"got {splits!r}")
    out = isc_features_to_metric(logits, splits=splits, shuffle=True, rng_seed=IS_SHUFFLE_SEED)
    return {"mean": out[KEY_METRIC_ISC_MEAN], "std": out[KEY_METRIC_ISC_STD], "splits": splits}


def precision_recall(pool_samples: torch.Tensor, pool_reference: torch.Tensor,
                     k: int = PR_NEIGHBORHOOD) -> dict[str, float]:
    """Improved precision and recall (torch-fidelity's `prc_features_to_metric`, memory-saving variant)."""
    torch_fidelity()
    from torch_fidelity.metric_prc import KEY_METRIC_PRECISION, KEY_METRIC_RECALL, prc_features_to_metric

    for name, feats in (("samples", pool_samples), ("reference", pool_reference)):
        if len(feats) < k + 1:
            raise ValueError(f"precision / recall need at least {k + 1} images on each side (k = {k} neighbours); "
                             f"the {name} have {len(feats)}")
    out = prc_features_to_metric(pool_samples.float(), pool_reference.float(), prc_neighborhood=k,
                                 prc_batch_size=10000, save_cpu_ram=True, verbose=False)
    return {"precision": out[KEY_METRIC_PRECISION], "recall": out[KEY_METRIC_RECALL]}


def _metrics(metrics: Sequence[str] | None, has_images: bool) -> list[str]:
    if metrics is None:  # everything the reference allows
        return ["fid", "is"] + (["pr"] if has_images else [])
    metrics = list(metrics)
    if not metrics or any(m not in METRICS for m in metrics):
        raise ValueError(f"metrics (--metrics) must be a non-empty list drawn from {', '.join(METRICS)}; got "
                         f"{metrics!r}")
    return list(dict.fromkeys(metrics))


def evaluate_npz(samples: str | Path, reference: str | Path | None, inception_weights: str | Path | None = None,
                 metrics: Sequence[str] | None = None, reference_stats: str = "auto", batch_size: int = 100,
                 is_splits: int = 10, device="cpu", progress: bool = True, extractor: Extractor | None = None) -> dict:
    """FID / IS / precision-recall of the ADM batch `samples` against the ADM batch `reference`.

    metrics: any of "fid", "is", "pr" (default: fid and is, and pr when the reference holds images; "is" alone
    needs no reference). reference_stats: "stored" takes the reference's `mu` / `sigma` (ADM's reference files
    carry them; note that ADM's were made by the TensorFlow graph), "images" computes them from its `arr_0`, "auto"
    the stored ones when present. `extractor`: a stand-in for the Inception (tests); by default the FID Inception
    from `inception_weights`."""
    samples = Path(samples)
    tf = torch_fidelity()  # the optional extra, before anything else is read
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size (--batch-size) must be an integer >= 1, got {batch_size!r}")
    if reference_stats not in REFERENCE_STATS:
        raise ValueError(f"reference_stats (--reference-stats) must be one of {', '.join(REFERENCE_STATS)}; got "
                         f"{reference_stats!r}")
    n, *hw = image_shape(samples, "--samples")
    ref_arrays = npz_arrays(reference, "--reference") if reference is not None else {}
    ref_has_images = "arr_0" in ref_arrays
    ref_has_stats = "mu" in ref_arrays and "sigma" in ref_arrays
    wanted = _metrics(metrics, ref_has_images)
    if reference is None and wanted != ["is"]:
        raise ValueError(f"reference (--reference) is required for {', '.join(m for m in wanted if m != 'is')}; "
                         f"only --metrics is runs without one")
    use_stored = "fid" in wanted and (reference_stats == "stored" or (reference_stats == "auto" and ref_has_stats))
    if use_stored and not ref_has_stats:
        raise ValueError(f"--reference {str(reference)!r} has no stored mu / sigma (arrays: "
                         f"{', '.join(sorted(ref_arrays))}); pass --reference-stats images or auto")
    need_ref_images = "pr" in wanted or ("fid" in wanted and not use_stored)
    if need_ref_images:
        if not ref_has_images:
            why = "precision / recall need" if "pr" in wanted else "--reference-stats images needs"
            raise ValueError(f"--reference {str(reference)!r} has no images (arr_0), which {why}; arrays: "
                             f"{', '.join(sorted(ref_arrays))}")
        m, *ref_hw = image_shape(reference, "--reference")
    if "fid" in wanted and n < 2:
        raise ValueError(f"--samples {str(samples)!r} holds {n} image; FID needs at least 2 (a covariance)")
    if "is" in wanted and not (isinstance(is_splits, int) and not isinstance(is_splits, bool) and 1 <= is_splits <= n):
        raise ValueError(f"is_splits (--is-splits) must be an integer in [1, {n}] (the number of samples), got "
                         f"{is_splits!r}")

    net = extractor
    if net is None:
        if inception_weights is None:
            raise ValueError("inception_weights (--inception-weights) is required: the FID Inception weights file")
        net = InceptionFeatures(inception_weights).to(device).eval()
    result = {"samples": str(samples), "num_samples": n, "sample_size": hw,
              "reference": None if reference is None else str(reference)}
    pool, logits = extract(iter_images(samples, batch_size, "--samples"), n, net, device, progress, "samples")
    if need_ref_images:
        ref_pool, _ = extract(iter_images(reference, batch_size, "--reference"), m, net, device, progress,
                              "reference")
        result.update(num_reference=m, reference_size=ref_hw)
    impl = {"features": getattr(net, "description", f"custom extractor {type(net).__name__}")}
    if "fid" in wanted:
        if use_stored:
            ref_stats = {"mu": read_array(reference, "mu", "--reference"),
                         "sigma": read_array(reference, "sigma", "--reference")}
            result["reference_statistics"] = f"mu / sigma stored in {reference}"
        else:
            ref_stats = statistics(ref_pool)
            result["reference_statistics"] = f"computed from the {m} images (arr_0) of {reference}"
        result["fid"] = frechet_distance(statistics(pool), ref_stats)
        impl["fid"] = f"torch-fidelity {tf.__version__} fid_statistics_to_metric (float64)"
    if "is" in wanted:
        result["inception_score"] = inception_score(logits, is_splits)
        impl["inception_score"] = (f"torch-fidelity {tf.__version__} isc_features_to_metric on the unbiased "
                                   f"logits, {is_splits} splits after a shuffle with seed {IS_SHUFFLE_SEED}")
    if "pr" in wanted:
        result.update(precision_recall(pool, ref_pool))
        impl["precision_recall"] = (f"torch-fidelity {tf.__version__} prc_features_to_metric on pool3 features, "
                                    f"k = {PR_NEIGHBORHOOD}")
    result["implementation"] = impl
    result["note"] = ("torch port of the TensorFlow Inception evaluation (ADM's suite): close to, not identical "
                      "with, numbers from ADM's evaluator")
    return result
