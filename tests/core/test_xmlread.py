"""dsc_core.xmlread: the one reused parser."""

from __future__ import annotations

from core_support import Act, repository_body, soap


def test_the_shared_parser_serves_several_threads_at_once() -> None:
    """xmlread reuses one lxml parser (its context has a lock): parses from many threads at
    the same moment each get their own, complete tree."""
    import threading

    from dsc_core import Limits
    from dsc_core.xmlread import parse_xml

    bodies = [soap(repository_body(f"dsc:Name{i}"), Act.DSC_REPOSITORY) for i in range(8)]
    errors: list[BaseException] = []

    def parse(body: bytes, name: str) -> None:
        try:
            for _ in range(200):
                root = parse_xml(body, Limits())
                assert root.xpath("string(//*[local-name()='Name'])") == f"dsc:{name}"
        except BaseException as exc:
            errors.append(exc)

    threads = [
        threading.Thread(target=parse, args=(body, f"Name{i}")) for i, body in enumerate(bodies)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert not errors, errors[:1]
