"""genworker: a Supabase job-queue worker that streams Gemini chapters into Postgres."""

__version__ = "0.1.0"
