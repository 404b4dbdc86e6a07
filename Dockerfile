# Two stages: the demo store is built with the pipeline (torch), the image that serves it has
# a serve-only install (`pip install .`: stores + explorer, no torch, no Dask).
#   docker build -t hoverlay .
#   docker run -p 5006:5006 hoverlay
FROM python:3.11-slim AS build
ENV PIP_NO_CACHE_DIR=1 PYTHONUNBUFFERED=1
WORKDIR /app
COPY pyproject.toml README.md ./
COPY hoverlay hoverlay
COPY stores stores
COPY pipeline pipeline
COPY explorer explorer
RUN pip install --extra-index-url https://download.pytorch.org/whl/cpu '.[build]' \
 && hoverlay demo --store /data/demo-store --images /data/demo-images --no-serve --quiet

FROM python:3.11-slim
ENV PIP_NO_CACHE_DIR=1 PYTHONUNBUFFERED=1
WORKDIR /app
COPY --from=build /app /app
RUN pip install . && python -c "import hoverlay.explorer.serve, sys; assert 'torch' not in sys.modules"
COPY --from=build /data/demo-store /data/demo-store
EXPOSE 5006
HEALTHCHECK CMD python -c "import urllib.request,sys; urllib.request.urlopen('http://127.0.0.1:5006/liveness', timeout=3)" || exit 1
CMD ["hoverlay", "serve", "/data/demo-store", "--address", "0.0.0.0", "--port", "5006", "--allow-websocket-origin", "*"]
