"""Unit tests for ``broker.daemon.results``: what leaves the daemon, redacted and capped.

``render_result`` for every content block kind (text, image, audio,
embedded text and blob resources, resource links), structured content with
and without text, ``is_error``, the redaction of a known secret everywhere
in the answer, and the output cap (the text cut on a character boundary,
the blocks and structured content dropped, the size reported). Then the
definition views: ``first_line``, ``described`` and ``catalog_entry``.
"""

from __future__ import annotations

from typing import Any

import mcp
import pytest

from broker.core import wire
from broker.daemon.redact import Redactor
from broker.daemon.results import TRUNCATED, catalog_entry, definition, described, first_line, hints, render_result

SECRET = "secretvalue123"
REDACTOR = Redactor({"demo.K": SECRET})
NONE = Redactor({})
BIG = 1 << 20
T = mcp.types


def result(*blocks: Any, structured: dict[str, Any] | None = None, is_error: bool = False) -> T.CallToolResult:
    return T.CallToolResult(content=list(blocks), structured_content=structured, is_error=is_error)


def text(value: str) -> T.TextContent:
    return T.TextContent(type="text", text=value)


def render(res: T.CallToolResult, cap: int = BIG, redactor: Redactor = NONE) -> dict[str, Any]:
    out, _size = render_result(res, cap, redactor)
    return out


# --- content blocks --------------------------------------------------------------------------------


def test_text_blocks_are_joined_by_newlines_and_kept_as_blocks() -> None:
    out, size = render_result(result(text("one"), text("two")), BIG, NONE)
    assert out == {
        "isError": False,
        "text": "one\ntwo",
        "content": [{"type": "text", "text": "one"}, {"type": "text", "text": "two"}],
    }
    assert size == len(wire.dumps(out["content"]))  # the largest of the three measures


def test_an_empty_result() -> None:
    out, size = render_result(result(), BIG, NONE)
    assert out == {"isError": False, "text": "", "content": []}
    assert size == len("null")  # structured content absent: wire.dumps(None)


@pytest.mark.parametrize("kind", ["image", "audio"])
def test_binary_blocks_become_a_placeholder_line_and_stay_as_blocks(kind: str) -> None:
    cls = T.ImageContent if kind == "image" else T.AudioContent
    block = cls(type=kind, data="QUJDRA==", mime_type=f"{kind}/x-test")
    out = render(result(text("before"), block))
    lines = out["text"].split("\n")
    assert lines[0] == "before"
    assert lines[1].startswith(f"[{kind} ") and lines[1].endswith(", 8 bytes base64]")
    assert out["content"][1]["type"] == kind and out["content"][1]["data"] == "QUJDRA=="


# the SDK dumps Python names (mime_type) unless by alias: the placeholder once never named the type
@pytest.mark.parametrize("kind", ["image", "audio"])
def test_the_placeholder_names_the_mime_type(kind: str) -> None:
    cls = T.ImageContent if kind == "image" else T.AudioContent
    out = render(result(cls(type=kind, data="QUJDRA==", mime_type=f"{kind}/x-test")))
    assert out["text"] == f"[{kind} {kind}/x-test, 8 bytes base64]"


def test_blocks_use_mcp_wire_names() -> None:
    out = render(result(T.ImageContent(type="image", data="QUJD", mime_type="image/png")))
    assert out["content"] == [{"type": "image", "data": "QUJD", "mimeType": "image/png"}]


def test_an_embedded_text_resource_shows_its_text() -> None:
    res = T.EmbeddedResource(type="resource", resource=T.TextResourceContents(uri="file:///a.txt", text="inside"))
    out = render(result(res))
    assert out["text"] == "inside"
    assert out["content"] == [{"type": "resource", "resource": {"uri": "file:///a.txt", "text": "inside"}}]


def test_an_embedded_blob_resource_shows_its_uri() -> None:
    res = T.EmbeddedResource(type="resource", resource=T.BlobResourceContents(uri="file:///a.bin", blob="AAEC"))
    out = render(result(res))
    assert out["text"] == "[resource file:///a.bin]"
    assert out["content"][0]["resource"]["blob"] == "AAEC"


def test_a_resource_link_shows_its_uri() -> None:
    out = render(result(T.ResourceLink(type="resource_link", uri="https://example.org/doc", name="doc")))
    assert out["text"] == "[resource https://example.org/doc]"
    assert out["content"][0]["name"] == "doc"


def test_every_kind_in_one_result_in_order() -> None:
    blocks = [
        text("t"),
        T.ImageContent(type="image", data="AAAA", mime_type="image/png"),
        T.ResourceLink(type="resource_link", uri="file:///l", name="l"),
        T.EmbeddedResource(type="resource", resource=T.TextResourceContents(uri="file:///r", text="r")),
    ]
    out = render(result(*blocks))
    lines = out["text"].split("\n")
    assert len(lines) == 4 and lines[0] == "t" and lines[2:] == ["[resource file:///l]", "r"]
    assert [b["type"] for b in out["content"]] == ["text", "image", "resource_link", "resource"]


def test_a_block_of_a_kind_it_does_not_know_adds_no_text_but_is_kept() -> None:
    odd = T.TextContent.model_construct(type="hologram", text="not shown")  # a kind from a later MCP revision
    out = render(result(text("seen"), odd))
    assert out["text"] == "seen"
    assert out["content"][1] == {"type": "hologram", "text": "not shown"}


# --- structured content and errors -----------------------------------------------------------------------


def test_structured_content_only_becomes_the_text_too() -> None:
    out = render(result(structured={"sum": 3, "items": [1, 2]}))
    assert out["structuredContent"] == {"sum": 3, "items": [1, 2]}
    assert wire.loads(out["text"]) == {"sum": 3, "items": [1, 2]}
    assert out["text"] == wire.dumps({"sum": 3, "items": [1, 2]})
    assert out["content"] == []  # the gate gives it the text as its one block (wire.call_result)


def test_structured_content_with_text_keeps_the_text() -> None:
    out = render(result(text("3"), structured={"sum": 3}))
    assert out["text"] == "3" and out["structuredContent"] == {"sum": 3}


def test_an_error_result_is_marked() -> None:
    out = render(result(text("it broke"), is_error=True))
    assert out["isError"] is True and out["text"] == "it broke"
    assert render(result(text("fine")))["isError"] is False


def test_what_no_side_can_encode_is_replaced_and_counted() -> None:
    out, _ = render_result(result(text("bad \udcff byte"), structured={"x": float("nan"), "y": 1}), BIG, NONE)
    assert out["_meta"]["mcp-privsep/sanitized"] == {"surrogates": 1, "non_finite": 1}
    assert out["text"] == "bad \ufffd byte" and out["content"][0]["text"] == "bad \ufffd byte"
    assert out["structuredContent"] == {"x": None, "y": 1}
    wire.dumps(out).encode("utf-8")  # the answer can be framed
    assert "_meta" not in render(result(text("clean")))


# --- redaction ---------------------------------------------------------------------------------------------


def test_a_known_secret_is_redacted_everywhere() -> None:
    res = result(
        text(f"the key is {SECRET}"),
        T.EmbeddedResource(
            type="resource", resource=T.TextResourceContents(uri=f"file:///{SECRET}", text=f"k={SECRET}")
        ),
        T.ResourceLink(type="resource_link", uri=f"https://x/?k={SECRET}", name="n"),
        structured={"token": SECRET, SECRET: [SECRET]},
    )
    out, _ = render_result(res, BIG, REDACTOR)
    assert SECRET not in wire.dumps(out)
    assert out["text"].split("\n") == [
        "the key is [REDACTED]",
        "k=[REDACTED]",
        "[resource https://x/?k=[REDACTED]]",
    ]
    assert out["structuredContent"] == {"token": "[REDACTED]", "[REDACTED]": ["[REDACTED]"]}
    assert out["content"][0]["text"] == "the key is [REDACTED]"


def test_a_secret_in_structured_only_text_is_redacted() -> None:
    out = render(result(structured={"k": SECRET}), redactor=REDACTOR)
    assert SECRET not in out["text"] and "[REDACTED]" in out["text"]


def test_a_secret_split_across_two_blocks_is_redacted_in_both_and_named_for_the_record() -> None:
    res = result(text(f"first half {SECRET[:6]}"), text(f"{SECRET[6:]} second half"), text("clean"))
    hits: set[str] = set()
    out, _ = render_result(res, BIG, REDACTOR, hits)
    assert out["text"] == "first half [REDACTED]\n[REDACTED] second half\nclean"
    assert [b["text"] for b in out["content"]] == ["first half [REDACTED]", "[REDACTED] second half", "clean"]
    assert hits == {"demo.K"}


def test_a_secret_split_across_a_text_and_a_resource_block_is_redacted() -> None:
    res = result(
        text(f"see {SECRET[:7]}"),
        T.EmbeddedResource(type="resource", resource=T.TextResourceContents(uri="file:///x", text=SECRET[7:])),
    )
    out = render(res, redactor=REDACTOR)
    assert SECRET[:7] not in out["text"] and out["content"][1]["resource"]["text"] == "[REDACTED]"


def test_a_secret_split_across_structured_values_is_redacted() -> None:
    out = render(result(text("ok"), structured={"a": SECRET[:5], "b": [SECRET[5:]]}), redactor=REDACTOR)
    assert out["structuredContent"] == {"a": "[REDACTED]", "b": ["[REDACTED]"]}


def test_a_numeric_secret_is_redacted_as_a_json_number() -> None:
    pin = Redactor({"bank.PIN": "31415926535"})
    hits: set[str] = set()
    out, _ = render_result(result(text("ok"), structured={"pin": 31415926535, "n": 7}), BIG, pin, hits)
    assert out["structuredContent"] == {"pin": "[REDACTED]", "n": 7} and hits == {"bank.PIN"}


def test_a_definition_leaking_a_secret_is_redacted_in_every_field_numbers_included() -> None:
    numeric = Redactor({"demo.K": SECRET, "demo.N": "27182818284"})
    spec = T.Tool(
        name="echo",
        title=f"Echo {SECRET[:4]}",
        description=f"uses %{SECRET.encode()[0]:02x}{SECRET[1:]}",
        input_schema={"type": "object", "properties": {"n": {"type": "integer", "default": 27182818284}}},
        output_schema={"type": "object", "description": SECRET.encode().hex()},
        _meta={"k": SECRET},
    )
    shown = catalog_entry("demo.echo", spec, numeric)
    dumped = wire.dumps(shown)
    assert SECRET not in dumped and SECRET.encode().hex() not in dumped and "27182818284" not in dumped
    assert shown["inputSchema"]["properties"]["n"]["default"] == "[REDACTED]"


def test_redaction_comes_before_the_cap() -> None:
    # the secret straddles the cut: cutting first would leak its prefix
    res = result(text("x" * 20 + SECRET + "y" * 200))
    out, _ = render_result(res, 64, REDACTOR)
    assert TRUNCATED in out.get("_meta", {})
    assert SECRET[:8] not in out["text"]
    assert out["text"].startswith("x" * 20 + "[REDACTED]")


# --- the output cap ------------------------------------------------------------------------------------------


def test_over_the_cap_the_text_is_cut_and_blocks_and_structured_content_dropped() -> None:
    body = "a" * 1000
    out, size = render_result(result(text(body), structured={"n": 1}), 100, NONE)
    assert size > 1000
    assert TRUNCATED in out.get("_meta", {})
    assert out["content"] == [{"type": "text", "text": out["text"]}] and "structuredContent" not in out
    assert out["_meta"][TRUNCATED] == {"size": size, "cap": 100}
    assert out["text"] == "a" * 100 + f"\n[output truncated: the result was {size} bytes, over the 100-byte cap]"
    assert out["isError"] is False


def test_a_result_at_the_cap_is_whole() -> None:
    res = result(text("abc"))
    _, size = render_result(res, BIG, NONE)
    out, again = render_result(res, size, NONE)
    assert again == size
    assert "_meta" not in out and out["text"] == "abc" and out["content"]
    out, _ = render_result(res, size - 1, NONE)
    assert TRUNCATED in out.get("_meta", {})


def test_large_structured_content_counts_against_the_cap() -> None:
    out, size = render_result(result(text("small"), structured={"blob": "z" * 500}), 200, NONE)
    assert size >= 500 and TRUNCATED in out.get("_meta", {})
    assert out["text"].startswith("small\n[output truncated")
    assert "structuredContent" not in out


def test_large_blocks_count_against_the_cap() -> None:
    out, size = render_result(result(T.ImageContent(type="image", data="A" * 4000, mime_type="image/png")), 500, NONE)
    assert size > 4000 and TRUNCATED in out.get("_meta", {}) and [b["type"] for b in out["content"]] == ["text"]


def test_the_cut_never_splits_a_character() -> None:
    out, _ = render_result(result(text("é" * 100)), 101, NONE)  # 200 bytes; 101 falls inside a character
    cut = out["text"].split("\n")[0]
    assert cut == "é" * 50
    out["text"].encode("utf-8")  # well-formed: no lone surrogate or replacement


def test_the_error_flag_survives_the_cap() -> None:
    out, _ = render_result(result(text("e" * 500), is_error=True), 64, NONE)
    assert out["isError"] is True and TRUNCATED in out.get("_meta", {})


# --- definitions ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "line"),
    [
        (None, ""),
        ("", ""),
        ("   \n\t\n", ""),
        ("One line.", "One line."),
        ("\n\n   First real line.  \nSecond line.", "First real line."),
        ("x" * 300, "x" * 200),
        ("  " + "y" * 250 + "  \nz", "y" * 200),
    ],
)
def test_first_line(value: str | None, line: str) -> None:
    assert first_line(value) == line


def spec(**extra: Any) -> T.Tool:
    fields: dict[str, Any] = {
        "name": "echo",
        "description": f"Echo, using {SECRET}",
        "input_schema": {"type": "object"},
    }
    fields.update(extra)
    return T.Tool(**fields)


def test_the_pinned_view_keeps_its_shape() -> None:
    """Pins hash definition(): its keys (and annotation spellings) stay as they were, or every pin breaks."""
    bare = spec(description=None)
    assert definition(bare) == {
        "name": "echo",
        "description": "",
        "input_schema": {"type": "object"},
        "annotations": {},
    }
    assert hints(bare) == {}
    annotated = spec(annotations=T.ToolAnnotations(read_only_hint=True))
    assert hints(annotated) == {"readOnlyHint": True}  # what clients read
    assert definition(annotated)["annotations"] == {"read_only_hint": True}  # what pins were made of


def test_described_is_the_wire_definition_redacted() -> None:
    schema = {"type": "object", "properties": {"key": {"type": "string", "default": SECRET}}}
    shown = described("demo.echo", spec(input_schema=schema), REDACTOR)
    assert shown["name"] == "demo.echo"
    assert shown["description"] == "Echo, using [REDACTED]"
    assert shown["inputSchema"]["properties"]["key"]["default"] == "[REDACTED]"
    assert SECRET not in wire.dumps(shown)
    assert set(shown) == {"name", "description", "inputSchema"}


def test_catalog_entry_uses_the_action_name_and_a_default_schema() -> None:
    entry = catalog_entry("demo.echo", spec(input_schema={}), REDACTOR)
    assert entry == {
        "name": "demo.echo",
        "description": "Echo, using [REDACTED]",
        "inputSchema": {"type": "object"},
    }
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}}
    assert catalog_entry("demo.echo", spec(input_schema=schema, description=None), NONE) == {
        "name": "demo.echo",
        "inputSchema": schema,
    }


def test_catalog_entry_carries_annotations_when_there_are_any() -> None:
    entry = catalog_entry("demo.echo", spec(annotations=T.ToolAnnotations(read_only_hint=True)), NONE)
    assert entry["annotations"] == {"readOnlyHint": True}
    assert "annotations" not in catalog_entry("demo.echo", spec(annotations=T.ToolAnnotations()), NONE)


def test_every_field_of_a_definition_reaches_the_client_in_wire_form() -> None:
    """title, outputSchema, icons, execution, _meta: a client that gets none of them works worse."""
    full = T.Tool.model_validate(
        {
            "name": "shot",
            "title": f"Screenshot {SECRET}",
            "description": "d",
            "inputSchema": {"type": "object"},
            "outputSchema": {"type": "object", "properties": {"n": {"type": "integer"}}},
            "annotations": {"title": "t", "readOnlyHint": True, "destructiveHint": False, "openWorldHint": True},
            "icons": [{"src": "https://example.org/i.png", "mimeType": "image/png", "sizes": ["48x48"]}],
            "execution": {"taskSupport": "optional"},
            "_meta": {"example.org/k": 1},
        }
    )
    entry = catalog_entry("demo.shot", full, REDACTOR)
    assert entry == {
        "name": "demo.shot",
        "title": "Screenshot [REDACTED]",
        "description": "d",
        "inputSchema": {"type": "object"},
        "outputSchema": {"type": "object", "properties": {"n": {"type": "integer"}}},
        "annotations": {"title": "t", "readOnlyHint": True, "destructiveHint": False, "openWorldHint": True},
        "icons": [{"src": "https://example.org/i.png", "mimeType": "image/png", "sizes": ["48x48"]}],
        "execution": {"taskSupport": "optional"},
        "_meta": {"example.org/k": 1},
    }
    assert described("demo.shot", full, NONE)["outputSchema"] == entry["outputSchema"]


def test_catalog_entry_annotations_use_mcp_wire_names() -> None:
    entry = catalog_entry("demo.echo", spec(annotations=T.ToolAnnotations(read_only_hint=True)), NONE)
    assert entry["annotations"] == {"readOnlyHint": True}


def test_every_block_keeps_its_wire_fields() -> None:
    """mimeType, annotations (lastModified), _meta, an embedded resource's mimeType: as the server sent them."""
    blocks = [
        {"type": "text", "text": "t", "annotations": {"audience": ["user"], "priority": 0.5}, "_meta": {"a/b": 1}},
        {"type": "image", "data": "QUJD", "mimeType": "image/png", "annotations": {"lastModified": "2026-01-01"}},
        {"type": "audio", "data": "QUJD", "mimeType": "audio/wav"},
        {"type": "resource", "resource": {"uri": "file:///r", "mimeType": "text/plain", "text": "r"}},
        {"type": "resource", "resource": {"uri": "file:///b", "mimeType": "application/x-b", "blob": "AAEC"}},
        {"type": "resource_link", "uri": "file:///l", "name": "l", "mimeType": "text/markdown", "size": 3},
    ]
    meta = {"example.org/trace": "x", "io.modelcontextprotocol/serverInfo": {"name": "upstream", "version": "1"}}
    res = T.CallToolResult.model_validate({"content": blocks, "_meta": meta})
    out = render(res)
    assert out["content"] == blocks
    assert out["_meta"] == {"example.org/trace": "x"}  # the protocol's own keys were of the upstream hop
    assert out["text"].split("\n")[1:3] == ["[image image/png, 4 bytes base64]", "[audio audio/wav, 4 bytes base64]"]
