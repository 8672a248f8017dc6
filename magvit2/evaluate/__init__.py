"""`python -m magvit2.evaluate {tokenizer,ar} SOURCE ...`: a finished run or a released Open-MAGVIT2 checkpoint on
the paper's protocol (tokenizer.py: rFID, PSNR, SSIM, LPIPS, utilization on an image folder; ar.py: 50 x 1000
samples split over processes, FID / IS against a reference), logged as MLflow runs with a results.json."""
