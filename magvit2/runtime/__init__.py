"""In-job side: what runs inside a member's process (context.py: one stage's run; dist.py: the process group and
accelerator; preempt.py: signals -> checkpoint -> requeue; tracker.py: its MLflow member run). Submission is
magvit2.sweep."""
