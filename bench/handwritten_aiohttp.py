"""A scan server written by hand as a user would (issue 20 point 3): aiohttp for HTTP, lxml to
parse each request and to build each reply.  It answers CreatePostScanJob,
GetRepositoryElements and GetPostScanJobElements (jobs in a dict), and nothing else: no
limits, no store, no identity.  ``bench/asgi.py`` measures the project against it.

    python3 bench/handwritten_aiohttp.py --port 5362
"""

from __future__ import annotations

import argparse
import uuid
from datetime import UTC, datetime

from aiohttp import web
from lxml import etree

SOAP = "http://www.w3.org/2003/05/soap-envelope"
WSA = "http://schemas.xmlsoap.org/ws/2004/08/addressing"
DSC = "http://schemas.microsoft.com/windows/2008/12/wdp/distributedscan/configuration"
DSP = "http://schemas.microsoft.com/windows/2008/12/wdp/distributedscan/processing"
FTR = "http://schemas.microsoft.com/windows/2007/10/imaging/postscan/filter"
ANONYMOUS = WSA + "/role/anonymous"
CONTENT_TYPE = "application/soap+xml; charset=utf-8"

jobs: dict[str, dict[str, str]] = {}


def envelope(
    action: str, relates_to: str, ns: dict[str, str]
) -> tuple[etree._Element, etree._Element]:
    """A reply envelope with its addressing headers; returns it and its Body."""
    env = etree.Element(f"{{{SOAP}}}Envelope", nsmap={"soap": SOAP, "wsa": WSA, **ns})
    header = etree.SubElement(env, f"{{{SOAP}}}Header")
    etree.SubElement(header, f"{{{WSA}}}To").text = ANONYMOUS
    etree.SubElement(header, f"{{{WSA}}}Action").text = action + "Response"
    etree.SubElement(header, f"{{{WSA}}}MessageID").text = f"urn:uuid:{uuid.uuid4()}"
    etree.SubElement(header, f"{{{WSA}}}RelatesTo").text = relates_to
    return env, etree.SubElement(env, f"{{{SOAP}}}Body")


def create_job(request: etree._Element, body: etree._Element) -> None:
    token = str(uuid.uuid4())
    created = datetime.now(UTC).isoformat(timespec="milliseconds")
    user = request.findtext(f".//{{{DSP}}}UserIdentifier") or ""
    jobs[token] = {"state": "Creating", "created": created, "user": user}
    response = etree.SubElement(body, f"{{{DSP}}}CreatePostScanJobResponse")
    etree.SubElement(response, f"{{{DSP}}}JobToken").text = token


def repository_elements(request: etree._Element, body: etree._Element) -> None:
    response = etree.SubElement(body, f"{{{DSC}}}GetRepositoryElementsResponse", nsmap={"ftr": FTR})
    elements = etree.SubElement(response, f"{{{DSC}}}RepositoryElements")
    for name in request.iterfind(f".//{{{DSC}}}RequestedElements/{{{DSC}}}Name"):
        data = etree.SubElement(elements, f"{{{DSC}}}ElementData")
        data.set(f"{{{DSC}}}Name", name.text or "")
        data.set(f"{{{DSC}}}Valid", "true")
        if name.text == "dsc:RepositoryStatus":
            status = etree.SubElement(data, f"{{{DSC}}}RepositoryStatus")
            etree.SubElement(status, f"{{{DSC}}}RepositoryState").text = "Idle"
            reasons = etree.SubElement(status, f"{{{DSC}}}RepositoryStateReasons")
            etree.SubElement(reasons, f"{{{DSC}}}RepositoryStateReason").text = "None"
        elif name.text == "dsc:RepositoryConfiguration":
            config = etree.SubElement(data, f"{{{DSC}}}RepositoryConfiguration")
            filters = etree.SubElement(config, f"{{{DSC}}}Filters")
            for dialect in ("fileshare", "sharepoint", "email"):
                entry = etree.SubElement(filters, f"{{{DSC}}}Filter")
                etree.SubElement(entry, f"{{{DSC}}}Dialect").text = f"ftr:{dialect}"
                etree.SubElement(entry, f"{{{DSC}}}FilterConfig")
        else:
            data.set(f"{{{DSC}}}Valid", "false")


def job_elements(request: etree._Element, body: etree._Element) -> None:
    token = request.findtext(f".//{{{DSP}}}JobToken") or ""
    job = jobs.get(token)
    if job is None:
        raise web.HTTPBadRequest(text="unknown job token")
    response = etree.SubElement(body, f"{{{DSP}}}GetPostScanJobElementsResponse")
    elements = etree.SubElement(response, f"{{{DSP}}}JobElements")
    data = etree.SubElement(elements, f"{{{DSP}}}ElementData")
    data.set(f"{{{DSP}}}Name", "dsp:JobStatus")
    data.set(f"{{{DSP}}}Valid", "true")
    status = etree.SubElement(data, f"{{{DSP}}}JobStatus")
    etree.SubElement(status, f"{{{DSP}}}JobToken").text = token
    etree.SubElement(status, f"{{{DSP}}}JobState").text = job["state"]
    reasons = etree.SubElement(status, f"{{{DSP}}}JobStateReasons")
    etree.SubElement(reasons, f"{{{DSP}}}JobStateReason").text = "None"
    etree.SubElement(status, f"{{{DSP}}}ImagesReceived").text = "0"
    etree.SubElement(status, f"{{{DSP}}}JobCreatedTime").text = job["created"]


HANDLERS = {
    f"{DSP}/CreatePostScanJob": (create_job, {"dsp": DSP}),
    f"{DSC}/GetRepositoryElements": (repository_elements, {}),
    f"{DSP}/GetPostScanJobElements": (job_elements, {"dsp": DSP}),
}


async def scan_server(request: web.Request) -> web.Response:
    try:
        document = etree.fromstring(await request.read())
    except etree.XMLSyntaxError:
        raise web.HTTPBadRequest(text="not XML") from None
    action = document.findtext(f"{{{SOAP}}}Header/{{{WSA}}}Action") or ""
    message_id = document.findtext(f"{{{SOAP}}}Header/{{{WSA}}}MessageID") or ""
    if action not in HANDLERS:
        raise web.HTTPBadRequest(text=f"unsupported action {action}")
    handler, ns = HANDLERS[action]
    reply, body = envelope(action, message_id, ns)
    handler(document, body)
    xml = etree.tostring(reply, xml_declaration=True, encoding="utf-8")
    return web.Response(body=xml, headers={"Content-Type": CONTENT_TYPE})


def make_app() -> web.Application:
    app = web.Application()
    app.router.add_post("/ScanServer", scan_server)
    return app


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="A hand-written aiohttp + lxml scan server")
    parser.add_argument("--port", type=int, default=5362)
    web.run_app(make_app(), host="127.0.0.1", port=parser.parse_args().port)
