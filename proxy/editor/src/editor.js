// The New job page's Python editor: CodeMirror 6 on top of the form's
// <textarea name="code">, which stays the field the form posts (the editor
// copies its text back before submitting). Bundled by scripts/build-editor.sh
// into proxy/static/editor.bundle.js; the page works with the bare textarea
// when the bundle is missing.
import { EditorState } from "@codemirror/state";
import {
  EditorView, drawSelection, highlightActiveLine, highlightActiveLineGutter, highlightSpecialChars,
  keymap, lineNumbers,
} from "@codemirror/view";
import { defaultKeymap, history, historyKeymap, indentWithTab } from "@codemirror/commands";
import {
  bracketMatching, defaultHighlightStyle, indentOnInput, indentUnit, syntaxHighlighting,
} from "@codemirror/language";
import { python } from "@codemirror/lang-python";

// The page's Content-Security-Policy allows no inline <style>, which is how
// CodeMirror styles a view in the document; inside a shadow root it uses a
// constructed style sheet instead, which the policy does not concern.
const theme = EditorView.theme({
  "&": { backgroundColor: "#fff", border: "1px solid #ccd", minHeight: "24rem", maxHeight: "70vh" },
  "&.cm-focused": { outline: "2px solid #457b9d" },
  ".cm-scroller": { fontFamily: "ui-monospace, monospace", fontSize: "14px", minHeight: "24rem" },
});

// Typing over a selection that spans lines is left to the browser's own
// editing, which in Chrome merges the lines with inline styles that the
// Content-Security-Policy blocks (a console error, the text stays right).
// Replacing the selection here does the same edit without that step.
const typeOverSelection = EditorView.domEventHandlers({
  beforeinput(event, view) {
    if (event.inputType !== "insertText" || !event.data || view.state.selection.main.empty) return false;
    event.preventDefault();
    view.dispatch(view.state.replaceSelection(event.data), { userEvent: "input.type", scrollIntoView: true });
    return true;
  },
});

function mount(textarea) {
  const host = document.createElement("div");
  host.className = "code-editor";
  const shadow = host.attachShadow({ mode: "open" });
  const view = new EditorView({
    root: shadow,
    parent: shadow,
    state: EditorState.create({
      doc: textarea.value,
      extensions: [
        lineNumbers(),
        highlightActiveLineGutter(),
        highlightSpecialChars(),
        history(),
        drawSelection(),
        indentOnInput(),
        indentUnit.of("    "),
        bracketMatching(),
        highlightActiveLine(),
        syntaxHighlighting(defaultHighlightStyle, { fallback: true }),
        python(),
        // Tab indents (PEP 8: four spaces); Escape then Tab leaves the editor.
        keymap.of([...defaultKeymap, ...historyKeymap, indentWithTab]),
        EditorView.contentAttributes.of({ "aria-label": "Python code" }),
        theme,
        typeOverSelection,
      ],
    }),
  });
  textarea.hidden = true;
  textarea.after(host);
  textarea.form.addEventListener("submit", () => { textarea.value = view.state.doc.toString(); });
  return {
    view,
    getCode: () => view.state.doc.toString(),
    setCode: (text) => view.dispatch({ changes: { from: 0, to: view.state.doc.length, insert: text } }),
  };
}

window.JobcloudEditor = { mount };
