"""``feddymem bench sites``: the real server (checks, FAISS K-means, reply) on many synthetic uploads."""

import json

from feddymem.cli import main


def test_the_servers_round_stays_bounded_as_sites_are_added(tmp_path):
    out = tmp_path / "sites"
    server = ["server.size=300", "server.kmeans_max_points=1200", "server.kmeans_iters=5"]
    assert main(["bench", "sites", *server, "--sites", "12", "2", "--items", "200", "--out", str(out)]) == 0
    few, many = json.loads((out / "results.json").read_text())["rows"]
    assert (few["sites"], many["sites"]) == (2, 12)
    assert (few["uploaded_items"], many["uploaded_items"]) == (400, 2400)
    # Two sites: every item is clustered and the global memory is capped at server.size.
    assert few["kmeans_points"] == 400 and few["global_items"] == 300
    # Twelve sites: K-means on the bounded sample, the same global memory, so each site receives the same.
    assert many["kmeans_points"] == 1200 and many["global_items"] == 300
    assert many["down_per_site_mb"] == few["down_per_site_mb"] > 0
    assert many["uploads_mb"] == 6 * few["uploads_mb"]
    table = (out / "results.md").read_text()
    assert "| 12 | 2,400 | 1,200 | 300 |" in table
