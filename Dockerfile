# CPU image: builds the demo store at build time and serves the explorer.
#   docker build -t hoverlay .
#   docker run -p 5006:5006 hoverlay
FROM python:3.11-slim
ENV PIP_NO_CACHE_DIR=1 PYTHONUNBUFFERED=1
WORKDIR /app
COPY pyproject.toml README.md ./
COPY stores stores
COPY pipeline pipeline
COPY explorer explorer
RUN pip install --extra-index-url https://download.pytorch.org/whl/cpu . \
 && hoverlay demo --store /data/demo-store --images /data/demo-images --no-serve --quiet
EXPOSE 5006
HEALTHCHECK CMD python -c "import urllib.request,sys; urllib.request.urlopen('http://127.0.0.1:5006/liveness', timeout=3)" || exit 1
CMD ["hoverlay", "serve", "/data/demo-store", "--address", "0.0.0.0", "--port", "5006", "--allow-websocket-origin", "*"]
