"""Where metric weights come from: path setting, then torch hub's cache, then a download, else Missing.

Downloads are tested against an HTTP server on 127.0.0.1 serving random-weight files (tests/weights.py): the
numbers they give are meaningless and only show that the metric is computed, never what it is.
"""
from __future__ import annotations

import functools
import http.server
import socket
import threading
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from magvit2.metrics import GenerationMetrics, InceptionFeatures, Missing, find_weights, inception_from_config
from magvit2.metrics import load_lpips, pretrained

try:
    from tests.weights import make_inception_weights
except ImportError:  # pytest run without the repo root on sys.path
    from weights import make_inception_weights

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def hub(tmp_path, monkeypatch):
    """An empty torch hub dir (TORCH_HOME in tmp) and no remembered download failures."""
    monkeypatch.setattr(torch.hub, "_hub_dir", None, raising=False)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setattr(pretrained, "_FAILED", {})
    return tmp_path / "torch" / "hub" / "checkpoints"


@pytest.fixture
def server(tmp_path):
    """Serves tmp_path/www on 127.0.0.1; yields (base url, folder, list of requested paths)."""
    www = tmp_path / "www"
    www.mkdir()
    seen: list[str] = []

    class Handler(http.server.SimpleHTTPRequestHandler):
        def do_GET(self):
            seen.append(self.path)
            super().do_GET()

        def log_message(self, *args):
            pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Handler, directory=str(www)))
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}", www, seen
    httpd.shutdown()
    httpd.server_close()


def closed_port_url() -> str:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()  # nothing listens there now: connection refused
    return f"http://127.0.0.1:{port}/x.pth"


def metrics_cfg(**kw):
    return OmegaConf.merge(OmegaConf.load(REPO / "conf" / "config.yaml").metrics, kw)


def test_config_defaults_are_the_libraries_own_urls():
    import torchvision
    from torch_fidelity.feature_extractor_inceptionv3 import URL_INCEPTION_V3

    m = OmegaConf.load(REPO / "conf" / "config.yaml").metrics
    assert m.download is True and m.inception_weights is None and m.vgg16_weights is None
    assert m.inception_url == pretrained.INCEPTION.url == URL_INCEPTION_V3
    assert m.vgg16_url == pretrained.LPIPS_TRUNKS["vgg"].url == torchvision.models.VGG16_Weights.IMAGENET1K_V1.url
    assert pretrained.LPIPS_TRUNKS["alex"].url == torchvision.models.AlexNet_Weights.IMAGENET1K_V1.url
    for spec in (pretrained.INCEPTION, *pretrained.LPIPS_TRUNKS.values()):  # the download lands under the hub name
        assert spec.url.rsplit("/", 1)[1] == spec.names[0]


def test_order_path_then_hub_cache_then_download(hub, tmp_path, server):
    base, www, seen = server
    spec = pretrained.LPIPS_TRUNKS["vgg"]
    (www / "v.pth").write_bytes(b"served")
    local = tmp_path / "local.pth"
    local.write_bytes(b"local")
    hub.mkdir(parents=True)
    (hub / spec.names[0]).write_bytes(b"cached")

    assert find_weights(spec, local, url=f"{base}/v.pth") == local  # the path setting wins
    assert find_weights(spec, None, url=f"{base}/v.pth").read_bytes() == b"cached"  # then the cache
    assert seen == []  # neither asked the server
    (hub / spec.names[0]).unlink()
    got = find_weights(spec, None, url=f"{base}/v.pth")  # then the download, into the cache
    assert got == hub / spec.names[0] and got.read_bytes() == b"served" and seen == ["/v.pth"]
    assert sorted(p.name for p in hub.iterdir()) == [spec.names[0]]  # no .partial file left

    (hub / spec.names[0]).unlink()
    off = find_weights(spec, None, url=f"{base}/v.pth", download=False)
    assert isinstance(off, Missing) and "metrics.download=false" in off.reason and "metrics.vgg16_weights" in off.reason
    assert seen == ["/v.pth"]


def test_download_into_hub_cache_then_the_metric_is_computed(hub, server):
    base, www, seen = server
    make_inception_weights(www / "inception.pth")
    net = inception_from_config(metrics_cfg(inception_url=f"{base}/inception.pth"))
    assert isinstance(net, InceptionFeatures)
    cached = hub / pretrained.INCEPTION.names[0]
    assert cached.read_bytes() == (www / "inception.pth").read_bytes() and seen == ["/inception.pth"]
    g = GenerationMetrics(net, is_splits=1)
    g.update_fake(torch.rand(2, 3, 16, 16) * 2 - 1)
    assert isinstance(g.compute()["is"], float)  # computed, not Missing (its value is meaningless: random weights)
    assert isinstance(inception_from_config(metrics_cfg(inception_url=f"{base}/inception.pth")), InceptionFeatures)
    assert seen == ["/inception.pth"]  # the second time it came from the cache


def test_unreachable_url_is_missing_naming_the_settings(hub):
    url = closed_port_url()
    inc = inception_from_config(metrics_cfg(inception_url=url))
    assert isinstance(inc, Missing)
    for part in ("metrics.inception_weights", "metrics.inception_url", url, str(hub.parent), "failed"):
        assert part in inc.reason, part
    assert not hub.exists() or not list(hub.iterdir())  # nothing half-written in the cache
    lp = load_lpips(None, url=url)
    assert isinstance(lp, Missing) and "metrics.vgg16_url" in lp.reason and "metrics.vgg16_weights" in lp.reason
    again = inception_from_config(metrics_cfg(inception_url=url))  # not retried at every evaluation
    assert isinstance(again, Missing) and "earlier in this process" in again.reason


def test_a_wrong_hash_is_not_accepted(hub, server):
    base, www, _ = server
    (www / "w.pth").write_bytes(b"not the expected file")
    spec = pretrained.WeightFile("test weights", ("w-deadbeef.pth",), "metrics.w", "metrics.w_url", f"{base}/w.pth",
                                 "deadbeef")
    got = find_weights(spec, None)
    assert isinstance(got, Missing) and "hash" in got.reason.lower() and not (hub / "w-deadbeef.pth").exists()
