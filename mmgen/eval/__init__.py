"""Evaluation: `compositional` (GenEval-style judge on the shapes world), `frechet` (FD-ENL0), `image_metrics`
(PSNR, SSIM, codebook usage), `classifier` (Fashion-MNIST class judge) and `harness` (`evaluate_model`,
`evaluate_pipeline`, `evaluate_tokenizer`: what `mmgen eval` runs). Import the submodules directly; none is
imported here, so loading one does not load the feature networks of the others."""
