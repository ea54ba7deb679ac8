import numpy as np

from feddymem.federation.egress import EgressPolicy, is_image_shaped, redact_paths
from feddymem.federation.messages import ClientEvaluation, ClientResult, TestSetMetrics
from feddymem.federation.wire import encode_evaluation, encode_result, encode_test_metrics
from feddymem.metrics.threshold import NormalScores


def _evaluation() -> ClientEvaluation:
    test = TestSetMetrics(0.8, {"tile": {"image_auroc": 0.8}}, 0.5, scores=[("/data/tile/a.png", 1, 2.5)])
    return ClientEvaluation(
        2,
        criterion=0.9,
        normal=NormalScores.of([1.0, 2.0, 4.0]),
        product_thresholds={"tile": 3.9},
        normalizer={},
        held_out_time_s=0.1,
        test=test,
        panel=[("/data/tile/a.png", np.zeros((32, 96, 3), np.uint8))],
        kept_test=test,
    )


def test_by_default_no_pixels_paths_or_per_image_scores_leave_a_site():
    policy = EgressPolicy.from_node_config({"client-id": 2, "out": "/site/run"})
    assert policy == EgressPolicy(panels=False, scores=False)
    sent = encode_evaluation(policy.evaluation(_evaluation()))
    assert policy.problems(sent.arrays, sent.config) == []
    assert not sent.arrays and not sent.config  # every number is a metric; nothing per image
    assert sent.metrics["test/image_auroc"] == 0.8 and sent.metrics["normal/count"] == 3
    assert sent.metrics["kept_test/image_auroc"] == 0.8
    final = encode_test_metrics(2, policy.test(_evaluation().test))
    assert not final.arrays and not final.config
    # Without the policy the same evaluation carries a panel and a path: the check names both.
    raw = encode_evaluation(_evaluation())
    problems = policy.problems(raw.arrays, raw.config)
    assert any("image-shaped" in p for p in problems) and any("names a file" in p for p in problems)


def test_a_site_opts_in_to_panels_and_scores_in_its_own_node_config():
    both = EgressPolicy.from_node_config({"share-panels": "true", "share-scores": True})
    sent = encode_evaluation(both.evaluation(_evaluation()))
    assert both.problems(sent.arrays, sent.config) == []
    assert any(k.startswith("panel") for k in sent.arrays) and {"test_scores", "kept_test_scores"} <= set(sent.arrays)
    scores_only = EgressPolicy.from_node_config({"share-scores": "yes"})
    sent = encode_evaluation(scores_only.evaluation(_evaluation()))
    assert "test_scores" in sent.arrays and not any(k.startswith("panel") for k in sent.arrays)


def test_an_error_message_keeps_its_words_not_the_files_it_names():
    result = ClientResult(1, error="OSError: cannot identify image file '/data/site/x_17.png' (truncated)")
    sent = encode_result(EgressPolicy().result(result))
    assert sent.config["error"] == "OSError: cannot identify image file <file> (truncated)"
    assert EgressPolicy().problems(sent.arrays, sent.config) == []
    assert redact_paths("C:\\scans\\a.dcm and b.PNG at 3 s") == "<file> and <file> at 3 s"


def test_image_shaped_arrays_are_told_from_memories_and_weights():
    assert is_image_shaped(np.zeros((32, 32, 3), np.float32)) and is_image_shaped(np.zeros(100, np.uint8))
    memory, conv = np.zeros((3136, 152), np.float32), np.zeros((152, 152, 1, 1), np.float32)
    assert not is_image_shaped(memory) and not is_image_shaped(conv) and not is_image_shaped(np.zeros(3, np.int64))
