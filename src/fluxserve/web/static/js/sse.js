// Server-sent events from a fetch() body. EventSource cannot POST, so the page parses the stream itself.

/**
 * Yield {event, data} for each event in a ReadableStream of bytes (text/event-stream).
 * Follows the parts of the SSE format fluxserve uses: "event:" and "data:" fields, blank-line
 * separated, CRLF or LF line ends; comment lines (":") are skipped.
 */
export async function* parseSSE(stream, signal) {
  const reader = stream.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  let event = "";
  let data = [];
  const onAbort = () => reader.cancel().catch(() => {});
  signal?.addEventListener("abort", onAbort, { once: true });
  try {
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buffer += decoder.decode(value, { stream: true });
      let newline;
      while ((newline = buffer.search(/\r\n|\n|\r/)) >= 0) {
        if (buffer[newline] === "\r" && newline === buffer.length - 1) break; // maybe half of a CRLF
        const line = buffer.slice(0, newline);
        buffer = buffer.slice(newline + (buffer.startsWith("\r\n", newline) ? 2 : 1));
        if (line === "") {
          if (data.length) yield { event, data: data.join("\n") };
          event = "";
          data = [];
        } else if (!line.startsWith(":")) {
          const colon = line.indexOf(":");
          const field = colon < 0 ? line : line.slice(0, colon);
          let value = colon < 0 ? "" : line.slice(colon + 1);
          if (value.startsWith(" ")) value = value.slice(1);
          if (field === "event") event = value;
          else if (field === "data") data.push(value);
        }
      }
    }
    if (data.length) yield { event, data: data.join("\n") };
    if (signal?.aborted) throw new DOMException("The stream was aborted", "AbortError");
  } finally {
    signal?.removeEventListener("abort", onAbort);
    try {
      reader.releaseLock();
    } catch {
      // a read was still pending (the stream was cancelled): nothing to release
    }
  }
}
