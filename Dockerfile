# A read-only hosted demo of Influence Atlas: the Streamlit app on the shipped runs, with the
# app's dependencies only (requirements-app.txt: no torch, no transformers).
#   docker build -t influence-atlas .
#   docker run --rm -p 8501:8501 influence-atlas      # then open http://localhost:8501
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    # Viewers can look, not start jobs or upload files (core/orchestration/jobs.py reads it).
    ATLAS_READONLY=1 \
    ATLAS_CACHE=/app/cache

WORKDIR /app
COPY requirements-app.txt .
RUN pip install -r requirements-app.txt

# Code and the shipped runs (small files only; see .dockerignore), owned by root, read-only
# for the unprivileged user the server runs as.
COPY app.py NOTICE README.md ./
COPY .streamlit .streamlit
COPY core core
COPY ui ui
COPY pages pages
COPY cache cache
RUN useradd --create-home --uid 10001 atlas
USER atlas

EXPOSE 8501
HEALTHCHECK --interval=30s --timeout=5s --start-period=30s \
    CMD python -c "import urllib.request as u; u.urlopen('http://127.0.0.1:8501/_stcore/health', timeout=4)"
CMD ["streamlit", "run", "app.py", "--server.address=0.0.0.0", "--server.port=8501", "--server.fileWatcherType=none"]
