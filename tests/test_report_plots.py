from feddymem.report import plot_roc


def test_roc_curves_need_per_image_scores(tmp_path):
    header = "client,label,score,path\n"
    (tmp_path / "scores.csv").write_text(header)  # a Flower run whose sites share no per-image scores
    assert plot_roc(tmp_path, tmp_path / "out") is None
    rows = "".join(
        f"0,{label},{score},img_{i}.png\n" for i, (label, score) in enumerate([(0, 0.1), (1, 0.9), (0, 0.3)])
    )
    (tmp_path / "scores.csv").write_text(header + rows)
    png = plot_roc(tmp_path, tmp_path / "out")
    assert png is not None and png.read_bytes()[:4] == b"\x89PNG"
