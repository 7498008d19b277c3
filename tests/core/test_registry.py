"""The operation registry: one declaration per action, and the declarations say what R4 and R8
need (who may call, which faults, which operation streams an attachment)."""

from __future__ import annotations

import pytest

from dsc_core import names
from dsc_core.operation import Operation, no_arguments
from dsc_core.registry import OPERATIONS, Registry

A = names.Action


def test_every_request_action_is_declared_once() -> None:
    actions = [op.action for op in OPERATIONS]
    assert len(actions) == len(set(actions))
    assert set(actions) == {
        A.DSP_CREATE,
        A.DSP_SEND_IMAGE,
        A.DSP_END,
        A.DSP_CANCEL,
        A.DSP_GET_JOB_ELEMENTS,
        A.DSC_GET_REPOSITORY_ELEMENTS,
        A.DSC_CANCEL,
        A.DSC_GET_JOB_ELEMENTS,
        A.DSC_GET_ACTIVE_JOBS,
        A.DSC_GET_JOB_HISTORY,
        A.EXT_PURGE_JOB_HISTORY,
        A.EXT_RETRY_JOB,
        A.TRANSFER_GET,
        A.PROBE,
        A.SUBSCRIBE,
        A.RENEW,
        A.GET_STATUS,
        A.UNSUBSCRIBE,
    }
    assert all(OPERATIONS.get(a) is not None for a in actions)
    assert OPERATIONS.get(A.MEX_GET_METADATA) is None  # not offered: ActionNotSupported


def test_declarations_carry_the_r4_and_r8_rules() -> None:
    for op in OPERATIONS:
        # R4 step 5 / R10: every MS-BDSRR operation, and only those, needs a scan admin.
        assert op.admin_only == (op.service == names.DSC), op.action
        # R4 steps 8-9: WS-DSP and MS-BDSRR answer with their own faults and stop with the
        # repository; the hosting operations (metadata, discovery, eventing) do not.
        assert op.repository_service == (op.service in (names.DSP, names.DSC)), op.action
        # R8: only SendImage streams an attachment.
        assert (op.begin_upload is not None) == (op.action == A.DSP_SEND_IMAGE), op.action


def test_two_claims_on_one_action_are_refused() -> None:
    def handle(request: object, args: None) -> object:
        raise AssertionError("never called")

    twice = Operation(A.PROBE, names.WSD, no_arguments, handle)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="two operations declare the action"):
        Registry([*OPERATIONS, twice])
