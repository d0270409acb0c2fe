"""metrics: index (job_id, step, item, name) for summaries and per-item result pages

`orchestrator metrics JOB` reads a job's summary (step -1, item '') and a results page of an evaluation reads its
per-item values (step -1, item > ''): with only the unique key (job_id, name, step, item) both scanned every metric
row of the job (200,000 for an evaluation of 25,000 pairs; benchmarks/db_scale.py).

Revision ID: 0003
Revises: 0002
"""

from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_index("ix_metrics_job_step_item", "metrics", ["job_id", "step", "item", "name"], unique=False)


def downgrade() -> None:
    op.drop_index("ix_metrics_job_step_item", table_name="metrics")
