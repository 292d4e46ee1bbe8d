// The module llama.cpp's server README documents, served at /completion.js:
//
//   import { llama } from '/completion.js'
//   for await (const chunk of llama("Tell me a joke", { n_predict: 64 })) {
//     document.write(chunk.data.content)
//   }
//
// llama(prompt, params, config): an async generator over the streamed /completion events, each as
// { data: <the event's JSON object> } (the last has data.stop true); it returns the whole content.
// config: api_url (default: this page's origin), endpoint (default /completion), controller (an
// AbortController: abort() hangs up and the server frees the slot at the next token), apiKey.
// llamaPromise: the whole content as a promise. llamaEventTarget: "message", "generation_settings",
// "timings" and "done" events. llamaComplete(params, controller, callback): callback per chunk.
// llamaModelInfo: the server's default generation settings (from /props).
// llamaStream(prompt, params, config): the bare event objects with no defaults added (the web page uses it).

const paramDefaults = {
  stream: true,
  n_predict: 500,
  temperature: 0.2,
  stop: ["</s>"],
};

let generationSettings = null;

export async function* llamaStream(prompt, params = {}, config = {}) {
  const headers = { "Content-Type": "application/json", "Accept": "text/event-stream" };
  const key = config.apiKey || params.api_key;
  if (key) headers["Authorization"] = `Bearer ${key}`;
  const base = (config.api_url || config.baseUrl || "").replace(/\/+$/, "");
  const response = await fetch(`${base}${config.endpoint || "/completion"}`, {
    method: "POST",
    body: JSON.stringify({ ...params, prompt, stream: true }),
    headers,
    signal: config.signal || (config.controller && config.controller.signal),
  });
  yield* sseEvents(response);
}

// The JSON objects of a fetch() response's server-sent events (`data: ...` lines; [DONE] ends nothing by
// itself); an error status or an error event becomes an Error with the server's message.
export async function* sseEvents(response) {
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
    if (done) return;
    buffer += decoder.decode(value, { stream: true });
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const event = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      for (const line of event.split("\n")) {
        if (!line.startsWith("data: ") || line === "data: [DONE]") continue;
        const data = JSON.parse(line.slice(6));
        if (data.error) throw new Error(data.error.message);
        yield data;
      }
    }
  }
}

export async function* llama(prompt, params = {}, config = {}) {
  const controller = config.controller || new AbortController();
  let content = "";
  try {
    for await (const data of llamaStream(prompt, { ...paramDefaults, ...params }, { ...config, controller })) {
      content += data.content || "";
      if (data.stop && data.generation_settings) generationSettings = data.generation_settings;
      yield { data };
      if (data.stop) break;
    }
  } finally {
    controller.abort();  // the stream is done or the caller left the loop: hang up either way
  }
  return content;
}

export const llamaEventTarget = (prompt, params = {}, config = {}) => {
  const target = new EventTarget();
  (async () => {
    let content = "";
    try {
      for await (const chunk of llama(prompt, params, config)) {
        content += chunk.data.content || "";
        target.dispatchEvent(new CustomEvent("message", { detail: chunk.data }));
        if (chunk.data.generation_settings) {
          target.dispatchEvent(new CustomEvent("generation_settings", { detail: chunk.data.generation_settings }));
        }
        if (chunk.data.timings) target.dispatchEvent(new CustomEvent("timings", { detail: chunk.data.timings }));
      }
    } catch (e) {
      target.dispatchEvent(new CustomEvent("error", { detail: e }));
    }
    target.dispatchEvent(new CustomEvent("done", { detail: { content } }));
  })();
  return target;
};

export const llamaPromise = async (prompt, params = {}, config = {}) => {
  let content = "";
  for await (const chunk of llama(prompt, params, config)) content += chunk.data.content || "";
  return content;
};

export const llamaComplete = async (params, controller, callback) => {
  for await (const chunk of llama(params.prompt, params, { controller })) callback(chunk);
};

export const llamaModelInfo = async (config = {}) => {
  if (!generationSettings) {
    const base = (config.api_url || config.baseUrl || "").replace(/\/+$/, "");
    const headers = config.apiKey ? { "Authorization": `Bearer ${config.apiKey}` } : {};
    const props = await (await fetch(`${base}/props`, { headers })).json();
    generationSettings = props.default_generation_settings;
  }
  return generationSettings;
};
