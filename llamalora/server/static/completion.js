// llamaStream: a streamed /completion request, yielding the object of every server-sent event (the last has
// stop: true). llamaComplete: the same, calling onChunk for each and returning the last. Cancel with an
// AbortController's signal: the server frees the slot as soon as the connection closes.
export async function* llamaStream(prompt, params = {}, config = {}) {
  const headers = { "Content-Type": "application/json", "Accept": "text/event-stream" };
  if (config.apiKey) headers["Authorization"] = `Bearer ${config.apiKey}`;
  const response = await fetch(`${config.baseUrl || ""}/completion`, {
    method: "POST",
    body: JSON.stringify({ ...params, prompt, stream: true }),
    headers,
    signal: config.signal,
  });
  if (!response.ok) {
    let message = `${response.status} ${response.statusText}`;
    try { message = (await response.json()).error.message; } catch (e) { /* not JSON */ }
    throw new Error(message);
  }
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  while (true) {
    const { done, value } = await reader.read();
    if (done) break;
    buffer += decoder.decode(value, { stream: true });
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const event = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      for (const line of event.split("\n")) {
        if (!line.startsWith("data: ")) continue;
        const data = JSON.parse(line.slice(6));
        if (data.error) throw new Error(data.error.message);
        yield data;
      }
    }
  }
}

export async function llamaComplete(prompt, params = {}, config = {}, onChunk = () => {}) {
  let last = null;
  for await (const chunk of llamaStream(prompt, params, config)) {
    onChunk(chunk);
    last = chunk;
  }
  return last;
}
