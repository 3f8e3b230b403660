"""PREMIS 3 preservation metadata for one source, from the provenance store: the source and every
output as file objects (SHA-256 fixity, size, format), the events that touched them (ingestion,
message digest calculation, each restoration run, fixity checks, review decisions), the agents
(scanrestore, each model with its hash and licence, each curator who decided), and each
output's derivation from the source."""

from __future__ import annotations

import json
import mimetypes
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import PurePosixPath
from typing import Any

from lxml import etree

from daemon.store import FIXITY_AUDIT, FIXITY_PROBLEMS, Event, RunRecord, Store
from pipeline.sourcetype import models_used

__all__ = ["PREMIS_NS", "PremisError", "premis_document", "premis_xml"]

PREMIS_NS = "http://www.loc.gov/premis/v3"
XSI_NS = "http://www.w3.org/2001/XMLSchema-instance"
SCHEMA_LOCATION = f"{PREMIS_NS} https://www.loc.gov/standards/premis/premis.xsd"
# Library of Congress controlled vocabularies (id.loc.gov/vocabulary/preservation/...).
EVENT_TYPES = "http://id.loc.gov/vocabulary/preservation/eventType"
LOCAL = "local"
SHA256 = "SHA-256"


class PremisError(Exception):
    """The store knows nothing of the source asked for."""


def _p(tag: str) -> str:
    return f"{{{PREMIS_NS}}}{tag}"


def _add(parent: etree._Element, tag: str, text: str | None = None, **attrs: str) -> Any:
    element = etree.SubElement(parent, _p(tag), attrs)
    if text is not None:
        element.text = text
    return element


def _at(moment: datetime) -> str:
    return moment.isoformat()


@dataclass
class _Document:
    """The premis element being built, and what was added to it so far (each agent once)."""

    root: etree._Element
    events: list[etree._Element] = field(default_factory=list)
    agents: dict[str, etree._Element] = field(default_factory=dict)
    object_events: dict[str, list[str]] = field(default_factory=dict)

    def link(self, object_id: str, event_id: str) -> None:
        self.object_events.setdefault(object_id, []).append(event_id)


def premis_xml(store: Store, source_sha256: str, *, licences: Mapping[str, str] = {}) -> bytes:
    """The PREMIS document of one source as UTF-8 XML bytes (see `premis_document`)."""
    return etree.tostring(
        premis_document(store, source_sha256, licences=licences),
        xml_declaration=True,
        encoding="UTF-8",
        pretty_print=True,
    )


def premis_document(
    store: Store, source_sha256: str, *, licences: Mapping[str, str] = {}
) -> etree._Element:
    """The premis element for the source with these bytes. `licences` (model id -> licence)
    fills in models whose run recorded none (runs before licences were recorded)."""
    known = {sha: (size, seen) for sha, size, seen in store.sources()}
    if source_sha256 not in known:
        raise PremisError(f"no source with sha256 {source_sha256} is recorded")
    size, first_seen = known[source_sha256]
    root = etree.Element(_p("premis"), nsmap={"premis": PREMIS_NS, "xsi": XSI_NS})
    root.set("version", "3.0")
    root.set(f"{{{XSI_NS}}}schemaLocation", SCHEMA_LOCATION)
    doc = _Document(root)
    observations = store.observations_of(source_sha256)
    source_id = f"sha256:{source_sha256}"
    runs = [run for run in store.runs_of(source_sha256) if run.status in ("done", "failed")]
    _source_events(doc, store, source_sha256, source_id, observations, first_seen)
    outputs: list[tuple[RunRecord, Any]] = []
    for run in runs:
        run_event = _run_event(doc, run, source_id, licences)
        for output in run.outputs:
            outputs.append((run, output))
            doc.link(output.path, run_event)
            doc.link(output.path, _digest_event(doc, output.path, run.finished_at, "output"))
    paths = [obs.path for obs in observations]
    _fixity_events(doc, store, {source_id: (paths, first_seen)} | _output_items(outputs))
    _review_events(doc, store, {output.path for _, output in outputs})
    names = list(dict.fromkeys(paths)) or [source_id]
    _file_object(doc, source_id, names, source_sha256, size, names[0], first=True)
    for run, output in outputs:
        _file_object(doc, output.path, [output.path], output.output_sha256, output.bytes)
        _derivation(root[-1], source_id, f"run-{run.id}")
    for event in doc.events:
        root.append(event)
    for agent in doc.agents.values():
        root.append(agent)
    return root


def _output_items(outputs: Iterable[tuple[RunRecord, Any]]) -> dict[str, tuple[list[str], Any]]:
    return {output.path: ([output.path], run.finished_at) for run, output in outputs}


# ------------------------------------------------------------------ objects


def _file_object(
    doc: _Document,
    object_id: str,
    names: list[str],
    sha256: str,
    size: int,
    original: str | None = None,
    *,
    first: bool = False,
) -> None:
    obj = etree.Element(_p("object"), {f"{{{XSI_NS}}}type": "premis:file"})
    identifier = _add(obj, "objectIdentifier")
    _add(identifier, "objectIdentifierType", LOCAL)
    _add(identifier, "objectIdentifierValue", object_id)
    for name in names if first else ():
        other = _add(obj, "objectIdentifier")
        _add(other, "objectIdentifierType", "filepath")
        _add(other, "objectIdentifierValue", name)
    characteristics = _add(obj, "objectCharacteristics")
    _add(characteristics, "compositionLevel", "0")
    fixity = _add(characteristics, "fixity")
    _add(fixity, "messageDigestAlgorithm", SHA256)
    _add(fixity, "messageDigest", sha256)
    _add(fixity, "messageDigestOriginator", "scanrestore")
    _add(characteristics, "size", str(size))
    fmt = _add(characteristics, "format")
    designation = _add(fmt, "formatDesignation")
    _add(designation, "formatName", _format_name(names[0]))
    if original is not None:
        _add(obj, "originalName", original)
    for event_id in doc.object_events.get(object_id, []):
        _linking_event(obj, event_id)
    doc.root.append(obj)


def _derivation(obj: etree._Element, source_id: str, event_id: str) -> None:
    """output -> source: derivation, "has source", through the run that made it (placed
    before the object's linkingEventIdentifiers, as the schema orders them)."""
    relationship = etree.Element(_p("relationship"))
    _add(relationship, "relationshipType", "derivation")
    _add(relationship, "relationshipSubType", "has source")
    related = _add(relationship, "relatedObjectIdentifier")
    _add(related, "relatedObjectIdentifierType", LOCAL)
    _add(related, "relatedObjectIdentifierValue", source_id)
    event = _add(relationship, "relatedEventIdentifier")
    _add(event, "relatedEventIdentifierType", LOCAL)
    _add(event, "relatedEventIdentifierValue", event_id)
    first_link = obj.find(_p("linkingEventIdentifier"))
    if first_link is not None:
        first_link.addprevious(relationship)
    else:
        obj.append(relationship)


def _format_name(path: str) -> str:
    guessed, _ = mimetypes.guess_type(PurePosixPath(path).name)
    return guessed or "application/octet-stream"


def _linking_event(parent: etree._Element, event_id: str) -> None:
    link = _add(parent, "linkingEventIdentifier")
    _add(link, "linkingEventIdentifierType", LOCAL)
    _add(link, "linkingEventIdentifierValue", event_id)


# ------------------------------------------------------------------ events


def _event(
    doc: _Document,
    event_id: str,
    event_type: str,
    when: datetime,
    *,
    details: Iterable[str] = (),
    outcome: str | None = None,
    outcome_notes: Iterable[str] = (),
    agents: Iterable[tuple[str, str]] = (),
    objects: Iterable[tuple[str, str]] = (),
) -> str:
    event = etree.Element(_p("event"))
    identifier = _add(event, "eventIdentifier")
    _add(identifier, "eventIdentifierType", LOCAL)
    _add(identifier, "eventIdentifierValue", event_id)
    if event_type in _EVENT_CODES:  # a term of the Library of Congress vocabulary
        _add(event, "eventType", event_type, authority="eventType", authorityURI=EVENT_TYPES)
        event[-1].set("valueURI", f"{EVENT_TYPES}/{_EVENT_CODES[event_type]}")
    else:
        _add(event, "eventType", event_type)
    _add(event, "eventDateTime", _at(when))
    for detail in details:
        _add(_add(event, "eventDetailInformation"), "eventDetail", detail)
    notes = list(outcome_notes)
    if outcome is not None:
        info = _add(event, "eventOutcomeInformation")
        _add(info, "eventOutcome", outcome)
        for note in notes:
            _add(_add(info, "eventOutcomeDetail"), "eventOutcomeDetailNote", note)
    for agent_id, role in agents:
        link = _add(event, "linkingAgentIdentifier")
        _add(link, "linkingAgentIdentifierType", LOCAL)
        _add(link, "linkingAgentIdentifierValue", agent_id)
        _add(link, "linkingAgentRole", role)
    for object_id, role in objects:
        link = _add(event, "linkingObjectIdentifier")
        _add(link, "linkingObjectIdentifierType", LOCAL)
        _add(link, "linkingObjectIdentifierValue", object_id)
        _add(link, "linkingObjectRole", role)
    doc.events.append(event)
    return event_id


# The Library of Congress codes of the event types used here.
_EVENT_CODES = {
    "ingestion": "ing",
    "message digest calculation": "mes",
    "creation": "cre",
    "fixity check": "fix",
}


def _source_events(
    doc: _Document,
    store: Store,
    sha: str,
    source_id: str,
    observations: list[Any],
    first_seen: datetime,
) -> None:
    """Ingestion of each path the bytes were seen at (a duplicate name says whose bytes it
    shares), and the SHA-256 calculated when they were first seen."""
    program = _program_agent(doc, None)
    duplicates = {
        event.path: event for event in store.events(kinds=["duplicate"], source_sha256=sha)
    }
    for observation in observations:
        details = [f"seen at {observation.path}"]
        if observation.modified_at is not None:
            details.append(f"file modified at {_at(observation.modified_at)}")
        duplicate = duplicates.get(observation.path)
        if duplicate is not None:
            details.append(
                f"duplicate: the same bytes as {duplicate.detail.get('same_bytes_as')}, "
                "not processed again; that source's outputs stand for this name too"
            )
        event_id = _event(
            doc,
            f"ingestion-{observation.id}",
            "ingestion",
            observation.seen_at,
            details=details,
            outcome="success",
            agents=[(program, "executing program")],
            objects=[(source_id, "source")],
        )
        doc.link(source_id, event_id)
    doc.link(source_id, _digest_event(doc, source_id, first_seen, "source"))


def _digest_event(doc: _Document, object_id: str, when: datetime, role: str) -> str:
    return _event(
        doc,
        f"digest-{object_id}",
        "message digest calculation",
        when,
        details=[f"{SHA256} of the whole file"],
        outcome="success",
        agents=[(_program_agent(doc, None), "executing program")],
        objects=[(object_id, role)],
    )


def _run_event(doc: _Document, run: RunRecord, source_id: str, licences: Mapping[str, str]) -> str:
    """A restoration run: creation of its outputs from the source, with the recipe, each
    stage and its parameters, and the program and models that ran."""
    stages = [
        {"stage": s.stage, "version": s.version, "params": s.params, "skipped": s.skipped}
        for s in run.stages
    ]
    details = [f"scanrestore run {run.id}, recipe sha256:{run.recipe_sha256}"]
    if run.run_token:
        details[0] += f", RunId {run.run_token} (in each output's XMP)"
    details += [
        f"stage {s['stage']} v{s['version']}"
        + (f" (skipped: {s['skipped']})" if s["skipped"] else "")
        + ": "
        + json.dumps(s["params"], sort_keys=True)
        for s in stages
    ]
    agents = [(_program_agent(doc, run.code_version), "executing program")]
    for use in models_used(stages):
        licence = use.licence or licences.get(use.id, "unknown")
        agents.append((_model_agent(doc, use.id, use.sha256, licence), "software"))
    objects = [(source_id, "source")] + [(out.path, "outcome") for out in run.outputs]
    event_id = _event(
        doc,
        f"run-{run.id}",
        "creation",
        run.finished_at,
        details=details,
        outcome="success" if run.status == "done" else "failure",
        outcome_notes=[run.error] if run.error else [],
        agents=list(dict.fromkeys(agents)),
        objects=objects,
    )
    doc.link(source_id, event_id)
    return event_id


def _fixity_events(
    doc: _Document, store: Store, items: Mapping[str, tuple[list[str], datetime]]
) -> None:
    """One fixity check per audit and object that existed when the audit started: pass, or
    fail with what the audit found (missing, unreadable, changed) at one of its paths."""
    audits = list(reversed(store.events(kinds=[FIXITY_AUDIT])))
    if not audits:
        return
    problems = store.events(kinds=list(FIXITY_PROBLEMS))
    program = _program_agent(doc, None)
    for audit in audits:
        started = datetime.fromisoformat(audit.detail["started_at"])
        found = [p for p in problems if started <= p.occurred_at <= audit.occurred_at]
        for object_id, (paths, since) in items.items():
            if since > started:
                continue
            failed = [p for p in found if p.path in paths]
            _fixity_event(doc, audit, object_id, failed, program)


def _fixity_event(
    doc: _Document, audit: Event, object_id: str, failed: list[Event], program: str
) -> None:
    notes = [
        f"{problem.kind.removeprefix('fixity_')}: {problem.path}"
        + (
            f" sha256 {problem.detail['actual_sha256']}"
            if "actual_sha256" in problem.detail
            else ""
        )
        for problem in failed
    ]
    event_id = _event(
        doc,
        f"fixity-{audit.id}-{object_id}",
        "fixity check",
        audit.occurred_at,
        details=[f"{SHA256} recomputed and compared with the recorded digest"],
        outcome="fail" if failed else "pass",
        outcome_notes=notes,
        agents=[(program, "executing program")],
        objects=[(object_id, "checked")],
    )
    doc.link(object_id, event_id)


def _review_events(doc: _Document, store: Store, outputs: set[str]) -> None:
    """Each curator's decision on one of the outputs: outcome approved or rejected, the note,
    and the curator as the agent who decided."""
    for review in store.reviews():
        if review.output_path not in outputs:
            continue
        curator = _curator_agent(doc, review.reviewer)
        event_id = _event(
            doc,
            f"review-{review.id}",
            "review decision",
            review.decided_at,
            details=["a curator judged the restored image"],
            outcome=review.decision,
            outcome_notes=[review.note] if review.note else [],
            agents=[(curator, "curator")],
            objects=[(review.output_path, "reviewed")],
        )
        doc.link(review.output_path, event_id)


# ------------------------------------------------------------------ agents


def _curator_agent(doc: _Document, name: str) -> str:
    agent_id = f"curator-{name}"
    if agent_id not in doc.agents:
        agent = etree.Element(_p("agent"))
        identifier = _add(agent, "agentIdentifier")
        _add(identifier, "agentIdentifierType", LOCAL)
        _add(identifier, "agentIdentifierValue", agent_id)
        _add(agent, "agentName", name)
        _add(agent, "agentType", "person")
        doc.agents[agent_id] = agent
    return agent_id


def _program_agent(doc: _Document, version: str | None) -> str:
    """scanrestore: one agent per version that ran (None: the version exporting)."""
    if version is None:
        from daemon.processing import code_version

        version = code_version()
    agent_id = f"scanrestore-{version}"
    if agent_id not in doc.agents:
        agent = etree.Element(_p("agent"))
        identifier = _add(agent, "agentIdentifier")
        _add(identifier, "agentIdentifierType", LOCAL)
        _add(identifier, "agentIdentifierValue", agent_id)
        _add(agent, "agentName", "scanrestore")
        _add(agent, "agentType", "software")
        _add(agent, "agentVersion", version)
        doc.agents[agent_id] = agent
    return agent_id


def _model_agent(doc: _Document, model_id: str, sha256: str, licence: str) -> str:
    """A model file: its id, SHA-256 (its version: the same id may name other weights) and
    licence."""
    agent_id = f"model-{model_id}-{sha256[:16]}"
    if agent_id not in doc.agents:
        agent = etree.Element(_p("agent"))
        identifier = _add(agent, "agentIdentifier")
        _add(identifier, "agentIdentifierType", LOCAL)
        _add(identifier, "agentIdentifierValue", agent_id)
        _add(agent, "agentName", model_id)
        _add(agent, "agentType", "software")
        _add(agent, "agentVersion", f"sha256:{sha256}")
        _add(agent, "agentNote", f"licence: {licence}")
        doc.agents[agent_id] = agent
    return agent_id
