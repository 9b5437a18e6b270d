# The image Fly.io builds (fly deploy). Render builds from render.yaml without it.
FROM python:3.11-slim
WORKDIR /app
COPY requirements.lock pyproject.toml README.md ./
COPY worker ./worker
COPY supabase ./supabase
RUN pip install --no-cache-dir -r requirements.lock && pip install --no-cache-dir --no-deps .
ENV PYTHONUNBUFFERED=1
EXPOSE 10000
CMD ["genworker", "run"]
