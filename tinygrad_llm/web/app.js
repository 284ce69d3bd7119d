// MyLLM's chat page. It talks to the server that served it, through two endpoints:
//   POST /v1/chat/completions  {messages, stream: true, ...}  the reply, as server-sent events
//   POST /v1/inspect           {messages, reply}              per reply token: top-10 and attention
// Plain DOM code, read top to bottom: helpers, chat, streaming, then "inside the last reply".

const state = {
  messages: [],       // the conversation, in OpenAI's format: [{role, content}]
  inspection: null,   // /v1/inspect's answer for the last reply
  busy: false,        // a reply is being written: the send button waits
};

const $ = (id) => document.getElementById(id);

// A token as the page shows it: special tokens by a short name, whitespace made visible.
function label(token) {
  const names = { "<|im_start|>": "⟨im_start⟩", "<|im_end|>": "⟨im_end⟩", "<BOS>": "⟨bos⟩",
                  "<EOS>": "⟨eos⟩", "<PAD>": "⟨pad⟩", "<UNK>": "⟨unk⟩", "\n": "↵", " ": "␣" };
  return names[token] ?? token;
}

function isSpecial(token) {
  return token.startsWith("<") && token.endsWith(">") && token.length > 1;
}

const percent = (p) => (100 * p).toFixed(p >= 0.1 ? 1 : 2) + "%";

function setStatus(text, isError = false) {
  $("status").textContent = text;
  $("status").style.color = isError ? "#dc2626" : "";
}

function addBubble(role, text) {
  const bubble = document.createElement("div");
  bubble.className = `bubble ${role}`;
  bubble.textContent = text;
  $("chat").appendChild(bubble);
  $("chat").scrollTop = $("chat").scrollHeight;
  return bubble;
}

// ---- chat --------------------------------------------------------------------------

async function send(text) {
  if (state.busy || !text.trim()) return;
  state.busy = true;
  $("send").disabled = true;
  const previous = document.querySelector(".bubble.last");
  if (previous) {                                   // only the newest reply stays clickable
    previous.classList.remove("last");
    previous.textContent = previous.dataset.text;
  }
  state.messages.push({ role: "user", content: text });
  addBubble("user", text);
  const prompt = state.messages.slice();            // what the reply answers (for /v1/inspect)
  const bubble = addBubble("assistant", "");
  bubble.classList.add("streaming");
  setStatus("writing…");
  try {
    const reply = await streamReply(prompt, bubble);
    state.messages.push({ role: "assistant", content: reply.text });
    bubble.dataset.text = reply.text;
    bubble.classList.add("last");
    const notes = [];
    if (reply.finish === "length") notes.push("stopped at max tokens");
    if (reply.truncated > 0) notes.push(`the oldest ${reply.truncated} tokens did not fit in the context and were cut`);
    setStatus(notes.join("; ") + (notes.length ? ". " : "") + "Looking inside…");
    // the same max_tokens as the reply's, so the prompt is cut the same way (the same context)
    state.inspection = await postJSON("/v1/inspect", { messages: prompt, reply: reply.text, max_tokens: maxTokens() });
    showReplyTokens(bubble, state.inspection);
    setStatus(notes.join("; ") + (notes.length ? ". " : "") + "Click a character of the reply to look inside.");
  } catch (err) {
    bubble.classList.add("error");
    bubble.textContent = bubble.textContent || "(no reply)";
    setStatus(String(err.message || err), true);
  } finally {
    bubble.classList.remove("streaming");
    state.busy = false;
    $("send").disabled = false;
  }
}

// The max tokens box: a number, or empty for the server's default (which fits the context).
function maxTokens() {
  const value = $("max-tokens").value.trim();
  return value === "" ? undefined : Number(value);          // JSON.stringify leaves undefined out
}

async function postJSON(url, body) {
  const response = await fetch(url, {
    method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(body),
  });
  const answer = await response.json();
  if (!response.ok) throw new Error(answer.error.message);
  return answer;
}

// ---- streaming: OpenAI's server-sent events ----------------------------------------

// Ask for a streamed reply and write each piece into `bubble` as it arrives.
async function streamReply(messages, bubble) {
  const body = { messages, stream: true, temperature: Number($("temperature").value), max_tokens: maxTokens() };
  const response = await fetch("/v1/chat/completions", {
    method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(body),
  });
  if (!response.ok) throw new Error((await response.json()).error.message);
  const reply = { text: "", finish: null, truncated: 0 };
  await readEvents(response, (chunk) => {
    const choice = chunk.choices[0];
    if (choice.delta.content) {
      reply.text += choice.delta.content;
      bubble.textContent = reply.text;
      $("chat").scrollTop = $("chat").scrollHeight;
    }
    if (choice.finish_reason) {                      // the last chunk
      reply.finish = choice.finish_reason;
      reply.truncated = chunk.prompt_truncated_tokens || 0;
    }
  });
  return reply;
}

// Server-sent events arrive as "data: {json}\n\n" in pieces of any size: keep what is not
// yet a whole event in `buffer`; call onChunk for each event until "data: [DONE]".
async function readEvents(response, onChunk) {
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  while (true) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += decoder.decode(value, { stream: true });
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const data = buffer.slice(0, end).replace(/^data: /, "");
      buffer = buffer.slice(end + 2);
      if (data === "[DONE]") return;
      onChunk(JSON.parse(data));
    }
  }
}

// ---- inside the last reply ---------------------------------------------------------

// Replace the reply's text by one clickable span per token, shaded by how unsure the model was.
function showReplyTokens(bubble, inspection) {
  bubble.textContent = "";
  inspection.tokens.forEach((t, i) => {
    const span = document.createElement("span");
    span.className = "token";
    span.dataset.index = i;
    span.textContent = t.token === "\n" ? "↵\n" : t.token;
    span.title = `p = ${percent(t.prob)}`;
    span.style.setProperty("--unsure", (0.6 * (1 - t.prob)).toFixed(3));
    span.addEventListener("click", () => showToken(i));
    bubble.appendChild(span);
  });
}

function showToken(i) {
  const inspection = state.inspection;
  const t = inspection.tokens[i];
  document.querySelectorAll(".token.selected").forEach((s) => s.classList.remove("selected"));
  document.querySelector(`.bubble.last .token[data-index="${i}"]`).classList.add("selected");
  $("inside-hint").hidden = true;
  $("token-panel").hidden = false;
  $("token-title").textContent =
    `“${label(t.token)}”, token ${i + 1} of the reply: the model gave it ${percent(t.prob)}. Its top 10:`;
  showAlternatives(t);
  showAttention(inspection, t);
}

// The 10 likeliest tokens at this place, as bars; the one the reply has is highlighted.
function showAlternatives(t) {
  const list = $("top-list");
  list.textContent = "";
  for (const alt of t.top) {
    const li = document.createElement("li");
    if (alt.token === t.token) li.className = "chosen";
    li.innerHTML = `<span class="label"></span><span><div class="bar"></div></span><span class="prob"></span>`;
    li.querySelector(".label").textContent = label(alt.token);
    li.querySelector(".bar").style.width = `${Math.max(0.5, 100 * alt.prob)}%`;
    li.querySelector(".prob").textContent = percent(alt.prob);
    list.appendChild(li);
  }
}

// One box per (layer, head): the context up to the predicting position, each token shaded by
// its attention weight. t.attention[layer][head] holds one weight per context position.
function showAttention(inspection, t) {
  const grid = $("heatmap");
  grid.textContent = "";
  grid.style.gridTemplateColumns = `repeat(${inspection.n_head}, minmax(0, 1fr))`;
  t.attention.forEach((heads, layer) => {
    heads.forEach((weights, head) => {
      const box = document.createElement("div");
      box.className = "head";
      const strongest = Math.max(...weights);
      const caption = document.createElement("span");
      caption.className = "caption";
      caption.textContent = `layer ${layer} · head ${head} (max ${percent(strongest)})`;
      box.appendChild(caption);
      weights.forEach((w, pos) => {
        const token = inspection.context[pos];
        const span = document.createElement("span");
        const kind = isSpecial(token) ? " special" : token.trim() === "" ? " blank" : "";
        span.className = "ctx" + kind + (pos === weights.length - 1 ? " query" : "");
        span.textContent = label(token);
        span.title = `${label(token)} (position ${pos}): ${percent(w)}`;
        span.style.setProperty("--weight", (w / strongest).toFixed(3));
        box.appendChild(span);
      });
      grid.appendChild(box);
    });
  });
}

// ---- wiring ------------------------------------------------------------------------

$("composer").addEventListener("submit", (e) => {
  e.preventDefault();
  const text = $("input").value;
  $("input").value = "";
  send(text);
});

$("input").addEventListener("keydown", (e) => {
  if (e.key === "Enter" && !e.shiftKey && !e.isComposing) {   // isComposing: an IME is still choosing
    e.preventDefault();
    $("composer").requestSubmit();
  }
});

$("new-chat").addEventListener("click", () => {
  state.messages = [];
  state.inspection = null;
  $("chat").textContent = "";
  $("token-panel").hidden = true;
  $("inside-hint").hidden = false;
  setStatus("");
});

// The model's name and context length, from GET /v1/models.
fetch("/v1/models").then((r) => r.json()).then((models) => {
  const model = models.data[0];
  $("model-name").textContent = `${model.id}, context ${model.context_length} tokens`;
  $("max-tokens").max = model.context_length - 1;
});
