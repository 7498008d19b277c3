"""Configuration reload (R7): new settings apply, the history shrinks, and subscribers get a
RepositoryElementsChangeEvent carrying the repository configuration."""

from __future__ import annotations

from datetime import timedelta

from lxml import etree

from core_support import cancel_job, create_job, subscribe
from dsc_bindings.inprocess import InProcessTransport
from dsc_core import DropJob, names
from dsc_core.model import EmailInstructions, FileShareInstructions
from helpers import parse, text, validate, xp

SHARE = FileShareInstructions((r"\\h\s",))


def test_reload_notifies_with_the_repository_configuration(bdsrr_schema: etree.XMLSchema) -> None:
    t = InProcessTransport()
    config = t.server.config
    ident, _ = subscribe(t, config.dsc_url, actions=[names.Action.DSC_ELEMENTS_CHANGE_EVENT])
    commands = t.server.reconfigure(config.replace(filters=("fileshare", "email")), t.clock)
    deliveries = [c for c in commands if getattr(c, "subscription_id", None) == ident]
    assert len(deliveries) == 1
    message = parse(deliveries[0].body)
    assert text(message, "//wsa:Action") == names.Action.DSC_ELEMENTS_CHANGE_EVENT
    assert text(message, "//wsa:To") == "http://sink.example/notify"
    event = xp(message, "/soap:Envelope/soap:Body/dsc:RepositoryElementsChangeEvent")[0]
    validate(bdsrr_schema, event)
    dialects = [d.text for d in xp(event, ".//dsc:Filter/dsc:Dialect")]
    assert dialects == ["ftr:fileshare", "ftr:email"]
    # The QName prefix is bound where it is used (R3).
    assert xp(event, ".//dsc:Dialect")[0].nsmap["ftr"] == names.FILTER


def test_reload_applies_new_settings_and_trims_the_history() -> None:
    t = InProcessTransport()
    tokens = []
    for _ in range(4):
        token = create_job(t, SHARE)
        assert cancel_job(t, names.DSC, token).status == 200
        tokens.append(token)
    config = t.server.config.replace(history_size=2, job_timeout_seconds=5.0, filters=("email",))
    commands = t.server.reconfigure(config, t.clock)
    assert [c.token for c in commands if isinstance(c, DropJob)] == tokens[:2]
    assert [j.token for j in t.server.jobs.history()] == tokens[:1:-1]
    # The new offer applies to the next job: a file-share filter is no longer offered (R6).
    token = create_job(t, SHARE)
    job = t.server.jobs.get(token)
    assert job is not None and job.state.value == "Aborted"
    assert [r.value for r in job.reasons] == ["NoValidPostScanInstructionsFound"]
    # And the new job timeout.
    token = create_job(t, EmailInstructions(False, ("user@contoso.com",)))
    assert t.server.next_deadline() == t.clock + timedelta(seconds=5)
    t.advance(5)
    job = t.server.jobs.get(token)
    assert job is not None and [r.value for r in job.reasons] == ["PostScanJobTimedOut"]
