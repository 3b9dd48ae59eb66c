import pytest

from moekit.plan import upcycle_advice


def test_skywork_two_x_rule():
    # mission.md (Skywork-MoE): C_moe >= 2 * C_dense -> scratch; below -> upcycle.
    assert upcycle_advice(1e21, 0.5e21).recommendation == "upcycle"
    assert upcycle_advice(1e21, 1.999e21).recommendation == "upcycle"
    advice = upcycle_advice(1e21, 2e21)
    assert advice.recommendation == "scratch" and advice.budget_ratio == 2.0
    assert "2.00x" in advice.reason


@pytest.mark.parametrize("bad", [0, -1.0, float("nan"), "1e21"])
def test_bad_budgets(bad):
    with pytest.raises(ValueError, match="dense_training_flops=.* expected a number of FLOPs"):
        upcycle_advice(bad, 1e21)
