/* A small Markdown renderer and code highlighter for the chat page.
 *
 * Hand-written on purpose: the page must work with no network (no CDN) and ship inside the
 * Python package, and chat answers need only fenced code, inline code, emphasis, headings,
 * lists, links and paragraphs. Everything is HTML-escaped before any markup is added.
 */
"use strict";

const CSMarkdown = (() => {
  const esc = (s) => s.replace(/&/g, "&amp;").replace(/</g, "&lt;").replace(/>/g, "&gt;").replace(/"/g, "&quot;");

  const KEYWORDS = new Set((
    "def class return if elif else for while in not and or is import from as with try except finally raise " +
    "lambda yield pass break continue global nonlocal async await None True False self " +
    "function var let const new this typeof instanceof switch case default do throw catch extends super " +
    "public private protected static final void int long float double char boolean byte short interface " +
    "package implements enum struct union unsigned signed sizeof typedef include define namespace using " +
    "template typename auto fn mut impl trait pub use mod match loop where func go chan defer select map " +
    "range type null undefined true false echo then fi done esac local export"
  ).split(" "));

  // One pass over the code: comments, strings, numbers, words; everything else is plain.
  const TOKEN = /(\/\/[^\n]*|#[^\n]*|\/\*[\s\S]*?\*\/)|("""[\s\S]*?"""|'''[\s\S]*?'''|"(?:\\.|[^"\\\n])*"|'(?:\\.|[^'\\\n])*'|`(?:\\.|[^`\\])*`)|(\b\d+(?:\.\d+)?\b)|([A-Za-z_][A-Za-z0-9_]*)/g;

  function highlight(code, lang) {
    let out = "", last = 0, m;
    const hashComments = !/^(c|cpp|c\+\+|java|javascript|js|typescript|ts|go|rust|rs)$/i.test(lang || "");
    TOKEN.lastIndex = 0;
    while ((m = TOKEN.exec(code)) !== null) {
      out += esc(code.slice(last, m.index));
      const [tok, comment, str, num, word] = m;
      if (comment && (comment[0] !== "#" || hashComments)) out += `<span class="tok-comment">${esc(tok)}</span>`;
      else if (comment) out += esc(tok);
      else if (str) out += `<span class="tok-string">${esc(tok)}</span>`;
      else if (num) out += `<span class="tok-number">${esc(tok)}</span>`;
      else if (word && KEYWORDS.has(word)) out += `<span class="tok-keyword">${esc(tok)}</span>`;
      else if (word && code[TOKEN.lastIndex] === "(") out += `<span class="tok-func">${esc(tok)}</span>`;
      else out += esc(tok);
      last = TOKEN.lastIndex;
    }
    return out + esc(code.slice(last));
  }

  function inline(text) {
    let s = esc(text);
    const codes = [];
    s = s.replace(/`([^`]+)`/g, (_, c) => { codes.push(c); return `\u0000${codes.length - 1}\u0000`; });
    s = s.replace(/\*\*([^*]+)\*\*/g, "<strong>$1</strong>")
         .replace(/(^|[^*])\*([^*\s][^*]*)\*/g, "$1<em>$2</em>")
         .replace(/\[([^\]]+)\]\((https?:\/\/[^)\s]+)\)/g, '<a href="$2" target="_blank" rel="noopener">$1</a>');
    return s.replace(/\u0000(\d+)\u0000/g, (_, i) => `<code>${codes[+i]}</code>`);
  }

  function codeBlock(code, lang) {
    const label = lang ? `<span class="lang">${esc(lang)}</span>` : "<span class=\"lang\">code</span>";
    return `<div class="codeblock">${label}<button class="copy" type="button" title="Copy code">Copy</button>` +
           `<pre class="code"><code data-lang="${esc(lang || "")}">${highlight(code, lang)}</code></pre></div>`;
  }

  function render(md) {
    const lines = md.split("\n");
    let html = "", para = [], list = null;
    const flushPara = () => { if (para.length) { html += `<p>${inline(para.join("\n")).replace(/\n/g, "<br>")}</p>`; para = []; } };
    const flushList = () => { if (list) { html += `<${list.tag}>${list.items.map((i) => `<li>${inline(i)}</li>`).join("")}</${list.tag}>`; list = null; } };
    for (let i = 0; i < lines.length; i++) {
      const line = lines[i];
      const fence = line.match(/^\s*```\s*([\w+#.-]*)\s*$/);
      if (fence) {
        flushPara(); flushList();
        const body = [];
        i++;
        while (i < lines.length && !/^\s*```\s*$/.test(lines[i])) body.push(lines[i++]);
        html += codeBlock(body.join("\n"), fence[1]);  // an unclosed fence (still streaming) renders too
        continue;
      }
      const h = line.match(/^(#{1,6})\s+(.*)$/);
      const ul = line.match(/^\s*[-*+]\s+(.*)$/);
      const ol = line.match(/^\s*\d+[.)]\s+(.*)$/);
      if (h) { flushPara(); flushList(); html += `<h${h[1].length + 2}>${inline(h[2])}</h${h[1].length + 2}>`; }
      else if (ul || ol) {
        flushPara();
        const tag = ul ? "ul" : "ol";
        if (!list || list.tag !== tag) { flushList(); list = { tag, items: [] }; }
        list.items.push((ul || ol)[1]);
      } else if (!line.trim()) { flushPara(); flushList(); }
      else { flushList(); para.push(line); }
    }
    flushPara(); flushList();
    return html;
  }

  return { render, highlight, escape: esc };
})();
