"""The page of `minledits app`: a photo inverted once, edits tried on it, and where each concept acts, step by step.

    app = App(args, folder)              the model (loaded once), the temporary folder, each session's state
    app.arguments(photo, options, out)   `minledits edit PHOTO -o OUT --OPTION=VALUE ...` parsed by the command's
                                         parser (options: the page's fields, named as the command's options)
    app.invert(session, args)            /invert: (inversion, made now or reused from the session, seconds)
    app.edit(session, photo, options)    /edit: the edit as the command makes it (its checks, methods and PNG
                                         writer: the same pixels), its trace, the time each part took
    app.files(session)                   /files: the last edit's PNG, inversion and trace files
    frames(trace, labels)(s)             step s of a trace: the x0 prediction, then each concept's (or word's) maps
    page(app), serve(app, host, port)    the Gradio Blocks (inputs left, results right), served with one queue

Gradio is imported only where the page is built: the package imports without it (the app extra).
An uploaded file is stored under the name of its SHA-256 (the name the user gave is shown, never a path), so the
inversions of a session are kept by the photo's content and the settings, as the command's cache keeps them.
"""
import hashlib
import inspect
import json
import secrets
import shlex
import shutil
import threading
import time
from collections import OrderedDict
from functools import partial
from pathlib import Path

import torch
from PIL import Image

from .. import ledits, p2p, rfinversion
from ..errors import MinleditsError, shorten
from ..inversion import invert
from ..io import store
from ..io.image import open_rgb, to_pil
from ..tools.trace import AttentionTrace, RFTrace, Trace, side_by_side, tile
from . import commands
from .options import COMMON, EDIT, INVERT, dest, parser, to_argv

MAX_UPLOAD_MB = 50          # the largest file the page takes; a picture's pixels are limited as any (io.image)
KEEP = 4                    # inversions kept per session (the oldest goes first)
SESSIONS = 16               # sessions kept (browser tabs, clients), each with its inversions and last edit
LOCAL_FONTS, MONO = ["ui-sans-serif", "system-ui", "sans-serif"], ["ui-monospace", "monospace"]  # no web fonts
LOCAL = ("127.0.0.1", "localhost", "::1")
MAP_NAMES = {"attn": "attention", "m_noise": "noise mask", "M": "applied mask", "acts": "mask"}
# The methods the page does not run, and why: the command runs them
NOT_HERE = {"flowedit": "it edits the photo itself, without an inversion"}
RF = "rf-inversion"  # its own inversion (rfinversion.invert), made by /invert where gamma is given
OWN = {"input", "output", "concepts", "user_mask", "save_inversion", "trace", "compare"}  # the page's own fields
INVERSION = {dest(flags, o) for flags, _, _, o in INVERT}
STEPS = next(default for flags, default, _, o in INVERT if dest(flags, o) == "steps")  # the steps field's default
MODEL = [dest(flags, o) for flags, _, _, o in COMMON if flags[0] not in ("--force", "-q", "-v")]


class Cancelled(MinleditsError):
    """The user pressed Cancel."""


class App:
    """The model of the command's arguments (loaded once, on its device and dtype), a temporary folder for every
    file the page writes, and per session its inversions (KEEP, newest last) and a cancel flag."""

    def __init__(self, args, folder):
        self.args, self.folder, self.models = args, Path(folder), {}
        self.sd = commands.model_of(args, self.models)
        self.sessions: dict[str, dict] = {}
        self.lock = threading.Lock()

    def session(self, key: str) -> dict:
        """The session `key`'s state (SESSIONS are kept, the one used longest ago goes first)."""
        with self.lock:
            state = self.sessions.pop(key, None) or {"inversions": OrderedDict(), "cancel": threading.Event(),
                                                     "runs": 0, "folder": secrets.token_hex(8)}
            self.sessions[key] = state
            while len(self.sessions) > SESSIONS:
                gone = self.sessions.pop(next(iter(self.sessions)))
                shutil.rmtree(self.folder / "runs" / gone["folder"], ignore_errors=True)
            return state

    # ----------------------------------------------------------------------------------------- files
    def stored(self, upload, what="the photo") -> tuple[Path, str]:
        """(the upload's copy under the name of its SHA-256, the name the user gave it, for messages only)."""
        if not upload:
            raise MinleditsError(f"no {what}: upload one")
        upload = Path(upload)
        if upload.stat().st_size > MAX_UPLOAD_MB * 2**20:
            raise MinleditsError(f"{what} is {upload.stat().st_size / 2**20:.0f} MB, over the page's limit of "
                                 f"{MAX_UPLOAD_MB} MB")
        digest = hashlib.sha256(upload.read_bytes()).hexdigest()
        path = self.folder / "inputs" / digest
        if not path.exists():
            path.parent.mkdir(exist_ok=True)
            shutil.copyfile(upload, path)
        return path, upload.name

    def arguments(self, photo: Path, options: dict, output: Path):
        """The Namespace of `minledits edit PHOTO -o OUTPUT --OPTION=VALUE ...` (the command's parser: its types,
        choices and one-line usage errors), on the app's model, device and dtype; the fields the method leaves to
        its input or itself left out (an inversion file's settings; RF-Inversion's: the flow inversion's, and the
        steps at the page's default, which run its own as the command does without --steps)."""
        left = INVERSION if commands.is_inversion_file(photo) else set()  # an inversion file's own settings
        if options.get("method") == RF or options.get("gamma") not in (None, ""):  # the flow inversion's fields
            left = left | set(commands.RF_UNUSED)
            if options.get("steps") == STEPS:  # the page's default: RF-Inversion's own, as the command without --steps
                left = left | {"steps"}
        given = {k: v for k, v in options.items() if v is not None and v != "" and k not in ("concepts", "user_mask")
                 and k not in left}
        concepts = [line.strip() for line in (options.get("concepts") or "").splitlines() if line.strip()]
        argv = ["edit", str(photo), "-o", str(output), *to_argv(given), *[f"--concept={c}" for c in concepts]]
        args = parser().parse_args(argv)
        for k in MODEL:
            setattr(args, k, getattr(self.args, k))
        args.quiet, args.force, args.verbose = True, True, False
        return args

    # ----------------------------------------------------------------------------------------- the work
    def invert(self, session: dict, args, progress=lambda done, total, what: None):
        """(the inversion of args.input, whether it was made now (else reused from the session), seconds): for
        --method rf-inversion, or where --gamma is given, RF-Inversion's own (as `minledits invert --gamma`). An
        inversion file is read and checked as the command reads it."""
        start = time.time()
        rf = args.method == RF or args.gamma is not None
        if commands.is_inversion_file(args.input):
            return (commands.rf_inversion_of if rf else commands.inversion_of)(args, self.models)[1], False, \
                time.time() - start
        if rf:
            commands.rf_inversion_options(args)  # its defaults; what it leaves unused refused
            commands.check_rf_model(args, self.sd)
            options = {k: getattr(args, k) for k in commands.RF_INVERSION}
            options["size"] = args.size or self.sd.default_size
            self.sd.check_fits(options["size"], options["size"])
            key = (Path(args.input).name, RF, *options.items())
        else:
            sampler_given = args.sampler is not None
            commands.resolve_inversion_options(args)
            commands.check_kind(args, self.sd, sampler_given)  # on SD3 the flow sampler; p2p refused there
            settings = commands.inversion_settings(args, self.sd.default_size)
            if args.method == "p2p" and args.local_blend:
                p2p.check_levels(self.sd.unet.config)
            key = (Path(args.input).name, settings, args.batch_size)
        if key in session["inversions"]:
            session["inversions"].move_to_end(key)
            return session["inversions"][key], False, time.time() - start
        image = commands.read_image(args.input)

        def step(done, total):
            stop(session)
            progress(done, total, "invert")
        if rf:
            inv = rfinversion.invert(self.sd, image, **options, callback=lambda st: step(st.i + 1, options["steps"]))
        else:
            inv = invert(self.sd, image, batch_size=args.batch_size, callback=step, **settings.dict())
        session["inversions"][key] = inv
        while len(session["inversions"]) > KEEP:
            session["inversions"].popitem(last=False)
        return inv, True, time.time() - start

    def files(self, session: dict) -> list[Path]:
        """The last edit's PNG, its inversion and its trace files (written on demand: the edit does not wait for
        them)."""
        last = session.get("last")
        if last is None:
            raise MinleditsError("no edit yet: press Edit first")
        folder = last["png"].parent
        if not (folder / "inversion.safetensors").exists():
            store.save(last["inversion"], folder / "inversion.safetensors")
            last["trace"].save(*Trace.files(folder / "trace"), concepts=last["concepts"])
        return [last["png"], folder / "inversion.safetensors", *Trace.files(folder / "trace")]

    def edit(self, session: dict, photo: Path, options: dict, user_mask=None,
             progress=lambda done, total, what: None) -> dict:
        """The edit of `photo` with the command's `options` (names as its option dests), its files in a fresh
        folder of the session: {"inversion", "inverted", "invert_s", "edit_s", "png", "compare", "frames" (a
        callable: step -> tiles), "steps", "idle"}; files() writes its inversion and trace."""
        session["runs"] += 1
        out = self.folder / "runs" / session["folder"] / str(session["runs"])
        out.mkdir(parents=True)
        if session["runs"] > 1:  # the previous run's files: the page has shown them
            shutil.rmtree(out.parent / str(session["runs"] - 1), ignore_errors=True)
        args = self.arguments(photo, {**options, "user_mask": None}, out / "edit.png")
        args.user_mask = user_mask
        if args.method in NOT_HERE:
            raise MinleditsError(f"--method {args.method} is not in the app: {NOT_HERE[args.method]}; run minledits "
                                 f"edit PHOTO --method {args.method}")
        concepts = commands.concepts_of(args)
        picture = commands.read_user_mask(args)
        inv, inverted, invert_s = self.invert(session, args, progress)
        start = time.time()
        mask = None if picture is None else commands.user_mask_of(args, picture, inv)
        idle = ledits.idle(concepts or [], len(inv.zs))
        trace, labels = self.trace_of(args, inv, concepts)

        def traced(st):  # each edit step: kept, counted, and the place where Cancel stops the work
            stop(session)
            trace(st)
            progress(len(trace.steps["t"]), len(inv.zs), "edit")

        count = iter(range(1, len(inv.zs) + 1))

        def counted(st):
            stop(session)
            progress(next(count), len(inv.zs), "reconstruct")
        im, recon, save = self.pictures(args, inv, concepts, mask, idle, traced, counted)
        edit_s = time.time() - start
        save(im, args.output)
        result = dict(inversion=inv, inverted=inverted, invert_s=invert_s, edit_s=edit_s, png=args.output,
                      idle=idle, steps=len(trace.steps["t"]), compare=None, frames=frames(trace, labels))
        if args.compare:
            result["compare"] = out / "compare.png"
            save(side_by_side([to_pil(inv.image)[0], *([recon] if recon else []), im]), result["compare"])
        session["last"] = dict(png=Path(args.output), inversion=inv, trace=trace,
                               concepts=[commands.spec(c) for c in concepts])
        return result

    def trace_of(self, args, inv, concepts) -> tuple:
        """(the edit's trace, the labels of its masks): Prompt-to-Prompt's words, or the concepts (RF-Inversion's:
        none)."""
        if args.method == "p2p":
            trace = AttentionTrace(self.sd, inv, p2p.word_positions(self.sd.tokenizer, args.target_prompt))
            return trace, [w for w, _ in trace.words]
        trace = RFTrace(self.sd, inv) if args.method == RF else Trace(self.sd, inv)
        return trace, [("-" if c.reverse else "") + c.prompt for c in concepts or []]

    def pictures(self, args, inv, concepts, mask, idle, traced, counted) -> tuple:
        """(the edit, the reconstruction or None, save(picture, path)) as the command makes and writes them:
        RF-Inversion's edit (--compare: input | edit) or the other methods' (--compare: input | reconstruction |
        edit); traced / counted: the edit's and the reconstruction's step callbacks."""
        if args.method == RF:
            im = commands.run_rfinversion(args, self.sd, inv, traced)
            record, argv = commands.rf_record(args, self.sd, inv)
            return im, None, partial(commands.write_png, record=record, argv=argv)
        im = commands.run_edit(args, self.sd, inv, args.target_prompt, concepts or [], traced, "edit", mask)
        recon = commands.run_edit(args, self.sd, inv, "", [], counted, "reconstruct") if args.compare else None
        return im, recon, partial(commands.save_png, args=args, sd=self.sd, inv=inv, concepts=concepts, idle=idle)


def choices_for(sd, key: str, choices) -> list:
    """The values the page offers for the field `key` on model sd: --method flowedit never (NOT_HERE: the command runs
    it), p2p not on a rectified flow, rf-inversion on FLUX alone; the flow sampler only on a flow, the others only
    elsewhere."""
    flow, flux = sd.prediction_type == "flow", getattr(sd, "guidance_embeds", None) is not None
    if key == "method":
        return [m for m in choices if m not in NOT_HERE and not (flow and m == "p2p") and (flux or m != RF)]
    if key == "sampler":
        return [x for x in choices if (x == "flow") == flow]
    return list(choices)


def stop(session: dict) -> None:
    if session["cancel"].is_set():
        raise Cancelled("cancelled")


def frames(trace: Trace, labels: list[str]):
    """A function: step s (from 1) -> [(picture, caption)]: the x0 prediction (through trace.rgb), then per
    concept (or word) each of its maps, white where it acts, enlarged (nearest) to at least 128 px."""
    x0 = trace.rgb(torch.stack(trace.steps["x0_hat"])[:, -1])  # [S, 3, h, w] in [0, 1]
    maps = [(MAP_NAMES[n], tile(torch.stack(trace.steps[n]), x0.shape[-2:])) for n in trace.ROWS if n in trace.steps]
    zoom = max(1, -(-128 // x0.shape[-1]))

    def picture(x):  # [3, h, w] in [0, 1]
        return to_pil(x[None].repeat_interleave(zoom, -1).repeat_interleave(zoom, -2) * 2 - 1)[0]

    def at(s: int):
        s = min(max(int(s), 1), len(x0)) - 1
        tiles = [(picture(x0[s]), "x0 prediction")]
        for c, label in enumerate(labels):
            tiles += [(picture(m[s, c, None].expand(3, -1, -1)), f"{label}: {name}") for name, m in maps]
        return tiles
    return at


def command(png: Path, name: str) -> str:
    """The `minledits edit` line that makes the PNG again: its parameters chunk, with the photo under the name the
    user gave it (quoted) and an output name."""
    text = Image.open(png).text
    stored = shlex.quote(json.loads(text["minledits"])["input"])
    return text["parameters"].replace(stored, shlex.quote(name), 1) + " -o edit.png"


def inverted(app: App, session: dict, path: Path, name: str, options: dict, report):
    """/invert's outputs: what happened, the preprocessed photo, the inversion file."""
    args = app.arguments(path, options, app.folder / "edit.png")
    inv, made, seconds = app.invert(session, args, report)
    file = app.folder / "inversions" / f"inversion-{path.name[:16]}-{len(session['inversions'])}.safetensors"
    file.parent.mkdir(exist_ok=True)
    store.save(inv, file)
    how = "inverted" if made else "reused the inversion of"
    return f"{how} {shorten(name)} in {seconds:.2f} s ({len(inv.zs)} steps to edit)", to_pil(inv.image)[0], [str(file)]


def message(e: BaseException, names: dict) -> str:
    """The command's one line for e, the stored uploads named as the user named them; where the error is none of the
    package's, its traceback goes to the server's log."""
    if not isinstance(e, (MinleditsError, ValueError, OSError)):
        commands.report(e, True, "error in the page")
    text = commands.one_line(e)
    for path, name in ((str(p), shorten(n)) for p, n in names.items() if p is not None):
        for quoted in (shorten(path, 500), shorten(path), path):  # as messages quote a path (errors.shorten), or not
            text = text.replace(quoted, name)
    return text


def status(result: dict, name: str) -> str:
    inv = result["inversion"]
    how = (f"inverted {shorten(name)} in {result['invert_s']:.1f} s" if result["inverted"] else
           f"reused the inversion of {shorten(name)} ({result['invert_s']:.2f} s)")
    text = f"{how}; edited {len(inv.zs)} steps in {result['edit_s']:.1f} s"
    for prompt, why in result["idle"].items():
        text += f"; concept {shorten(prompt)} never acts ({why})"
    return text


def concept_spec(prompt, remove, scale, threshold, warmup, cooldown) -> str:
    """A concept in the -e syntax from the page's fields (empty: the method's default)."""
    prompt = (prompt or "").strip()
    if not prompt:
        raise MinleditsError("the concept is empty: type what to add or remove")
    given = {"scale": scale, "threshold": threshold, "warmup": warmup, "cooldown": cooldown}
    opts = ",".join(f"{k}={str(v).strip()}" for k, v in given.items() if v is not None and str(v).strip())
    return ("-" if remove else "") + prompt + (":" + opts if opts else "")


# --------------------------------------------------------------------------------------------- the page
def page(app: App):
    """The Gradio Blocks of the app (import gradio inside: the app extra)."""
    import gradio as gr

    def component(flags, default, help, options):
        label, key = flags[-1].lstrip("-").replace("-", " "), dest(flags, options)
        help = help.split(" (default")[0]  # the page shows the default in the field (an empty field: the method's)
        if options.get("action") == "store_true":
            return gr.Checkbox(value=default, label=label, info=help, elem_id=key)
        if "choices" in options:
            choices = choices_for(app.sd, key, options["choices"])
            return gr.Radio(choices, value=default if default in choices else choices[0], label=label, info=help,
                            elem_id=key)
        if options.get("type") in (int, float) and default is not None:  # (an empty Number would read 0)
            return gr.Number(value=default, label=label, info=help, elem_id=key,
                             precision=0 if options["type"] is int else None)
        return gr.Textbox(value=default or "", label=label, info=help, lines=1, elem_id=key,
                          placeholder="default" if default is None else None)

    fields = {}

    def fields_of(table, names):
        for row in table:
            if dest(row[0], row[3]) in names:
                fields[dest(row[0], row[3])] = component(*row)

    sd = app.sd
    with gr.Blocks(title="minledits", delete_cache=(600, 3600)) as demo:  # Gradio's copies: 60 minutes
        gr.Markdown(f"# minledits: edit a photo\nModel **{sd.model_id}** on {sd.device.type}, {sd.dtype}. "
                    "**1** Upload a photo (or an inversion file, which brings its own inversion settings). "
                    "**2** Add concepts to add or remove (or a target prompt). **3** Press **Edit**: the photo is "
                    "inverted once, then each edit reuses it. The trace below the result shows, step by step, where "
                    "each concept acts.")
        with gr.Row():
            with gr.Column(scale=1):
                photo = gr.File(label="Photo or inversion file", elem_id="photo",
                                type="filepath", height=120)
                preview = gr.Image(label="The photo", interactive=False, height=200)
                with gr.Accordion("Inversion", open=True):
                    with gr.Row():
                        fields_of(INVERT, ["steps", "skip", "seed", "size"])
                    fields_of(INVERT, ["source_prompt"])
                    with gr.Accordion("More inversion options", open=False):
                        fields_of(INVERT, ["source_guidance", "sampler", "keep_aspect", "keep_last_noise",
                                           "zero_noise_steps", "batch_size"])
                with gr.Group():
                    fields_of(EDIT, ["method"])
                    fields_of(EDIT, ["target_prompt", "target_guidance"])
                with gr.Group() as g_concepts:  # LEDITS' and LEDITS++' (hidden for the methods without concepts)
                    concepts = gr.Textbox(label="concepts (one per line: glasses adds, -beard removes; "
                                          "glasses:scale=6 sets an option)", lines=3, placeholder="glasses\n-beard",
                                          elem_id="concepts")
                    with gr.Row():
                        c_prompt = gr.Textbox(label="concept", placeholder="glasses", scale=2, elem_id="concept")
                        c_remove = gr.Checkbox(label="remove it", value=False)
                    with gr.Row():
                        c_opts = [gr.Textbox(label=k, value="", placeholder="default", min_width=80)
                                  for k in ("scale", "threshold", "warmup", "cooldown")]
                    with gr.Row():
                        add = gr.Button("Add concept", size="sm", elem_id="add")
                        clear = gr.Button("Remove all concepts", size="sm")
                compare = gr.Checkbox(label="also show input | reconstruction | edit (one more pass)", value=False)
                with gr.Row():
                    b_invert = gr.Button("Invert")
                    b_edit = gr.Button("Edit", variant="primary", elem_id="edit")
                    b_cancel = gr.Button("Cancel", variant="stop")
                with gr.Accordion("LEDITS options", open=False, visible=True) as g_ledits:
                    fields_of(EDIT, ["momentum_scale", "momentum_beta"])
                with gr.Accordion("LEDITS++ options", open=True, visible=False) as g_pp:
                    fields_of(EDIT, ["mask", "negative_prompt", "guidance_rescale"])
                    user_mask = gr.File(label="user mask (white: may act)", type="filepath",
                                        height=100)
                with gr.Accordion("Prompt-to-Prompt options", open=True, visible=False) as g_p2p:
                    fields_of(EDIT, ["cross_replace", "self_replace", "reweight", "local_blend"])
                groups = [g_ledits, g_pp, g_p2p]
                if RF in choices_for(sd, "method", [RF]):  # its inversion's gamma, its edit's options (FLUX)
                    with gr.Accordion("RF-Inversion options (empty: its defaults)", open=True, visible=False) as g_rf:
                        fields_of(INVERT, ["gamma"])
                        fields_of(EDIT, ["eta", "start_timestep", "stop_timestep", "guidance"])
                    groups.append(g_rf)
            with gr.Column(scale=1):
                said = gr.Textbox(label="status", interactive=False, lines=1, elem_id="status")
                edited = gr.Image(elem_id="edited", label="Edit", interactive=False, format="png", height=320)
                strip = gr.Image(label="Input | reconstruction | edit", interactive=False, format="png",
                                 visible=False, height=200)
                gr.Markdown("### Where each concept acts\nThe x0 prediction at a step, then for each concept its "
                            "mask (white: the concept acts there).")
                at = gr.Slider(1, 2, value=1, step=1, label="step", interactive=True, elem_id="step")
                tiles = gr.Gallery(elem_id="tiles", label="x0 prediction and masks at this step", columns=4, height=260,
                                   object_fit="contain", allow_preview=False)
                downloads = gr.File(label="Downloads: the PNG (with its parameters), the inversion, the trace",
                                    file_count="multiple", interactive=False, elem_id="downloads")
                b_files = gr.Button("Add the inversion and trace files", size="sm", elem_id="files")
                line = gr.Textbox(label="the same edit from the command line", interactive=False, lines=3,
                                  max_lines=8, buttons=["copy"], elem_id="command")
                gr.Markdown("A concept's options: **scale** (strength), **threshold** (it acts only where its "
                            "guidance is in the top 1 - threshold), **warmup** (edit steps before it acts), "
                            "**cooldown** (the edit step from which it stops). `minledits edit --help` tells more.")

        names = [k for k in fields if k not in OWN]
        kw = {k: fields[k] for k in names}

        def run(kind, photo, user_mask_file, compare_on, opts, request, progress):
            session = app.session(request.session_hash if request else "")
            session["cancel"].clear()
            report = lambda done, total, what: progress((done, total), desc=what) if done % -(-total // 20) == 0 \
                or done == total else None  # 20 updates a pass at most: each is a message to the page
            path = mask = None
            name = ""
            try:
                path, name = app.stored(photo)
                mask = app.stored(user_mask_file, "the user mask")[0] if user_mask_file else None
                options = {**opts, "compare": compare_on or None}
                if kind == "invert":
                    return inverted(app, session, path, name, options, report)
                result = app.edit(session, path, options, mask, report)
            except Exception as e:
                raise gr.Error(message(e, {path: name, mask: "the user mask"}), print_exception=False) from None
            session["frames"], session["steps"] = result["frames"], result["steps"]
            S = result["steps"]
            files = [str(result["png"])]
            return (status(result, name), str(result["png"]),
                    gr.update(value=str(result["compare"]) if result["compare"] else None,
                              visible=bool(result["compare"])),
                    gr.update(minimum=1, maximum=max(S, 2), value=S), show_step(S, request), files,
                    command(result["png"], name))

        def do_invert(photo, request: gr.Request, progress=gr.Progress(), **opts):
            return run("invert", photo, None, False, opts, request, progress)

        def do_edit(photo, user_mask, compare, request: gr.Request, progress=gr.Progress(), **opts):
            return run("edit", photo, user_mask, compare, opts, request, progress)

        def show_step(s, request: gr.Request):
            session = app.session(request.session_hash if request else "")
            if not session.get("frames"):
                return gr.update(value=[])
            s, S = min(max(int(s or 1), 1), session["steps"]), session["steps"]
            return gr.update(value=session["frames"](s), label=f"step {s} of {S}: the x0 prediction, then each "
                             "concept's mask")

        def show_photo(photo):
            path, name = None, ""
            try:
                path, name = app.stored(photo)
                return to_pil(store.load(path).image)[0] if commands.is_inversion_file(path) else open_rgb(path)
            except Exception as e:
                raise gr.Error(message(e, {path: name}), print_exception=False) from None

        def files(request: gr.Request):
            try:
                return [str(p) for p in app.files(app.session(request.session_hash if request else ""))]
            except Exception as e:
                raise gr.Error(message(e, {}), print_exception=False) from None

        def cancel(request: gr.Request):
            app.session(request.session_hash)["cancel"].set()
            return "cancelled"

        def add_concept(text, *fields):
            try:
                line = concept_spec(*fields)
            except MinleditsError as e:
                raise gr.Error(str(e), print_exception=False) from None
            return (text.rstrip("\n") + "\n" if text and text.strip() else "") + line, "", False

        def method_shown(method):  # each method's options; concepts for LEDITS and LEDITS++; CFG but for RF-Inversion
            return [gr.update(visible=method == m) for m in ("ledits", "leditspp", "p2p", RF)[:len(groups)]] + [
                gr.update(visible=method in ("ledits", "leditspp")), gr.update(visible=method != RF)]

        inv_kw = {k: fields[k] for k in names if k in INVERSION}
        optional(do_invert, inv_kw)
        optional(do_edit, {**kw, "concepts": concepts})
        ev_inv = b_invert.click(do_invert, inputs=[photo], inputs_kwargs=inv_kw, outputs=[said, preview, downloads],
                                api_name="invert", concurrency_limit=1, concurrency_id="model")
        ev_edit = b_edit.click(do_edit, inputs=[photo, user_mask, compare], inputs_kwargs={**kw, "concepts": concepts},
                               outputs=[said, edited, strip, at, tiles, downloads, line], api_name="edit",
                               concurrency_limit=1, concurrency_id="model")
        b_files.click(files, outputs=[downloads], api_name="files", concurrency_limit=1, concurrency_id="model")
        b_cancel.click(cancel, outputs=[said], cancels=[ev_inv, ev_edit], api_name="cancel", queue=False)
        at.change(show_step, inputs=[at], outputs=[tiles], api_visibility="private", queue=False)
        photo.upload(show_photo, inputs=[photo], outputs=[preview], api_visibility="private", queue=False)
        add.click(add_concept, inputs=[concepts, c_prompt, c_remove, *c_opts], outputs=[concepts, c_prompt, c_remove],
                  api_visibility="private", queue=False)
        clear.click(lambda: "", outputs=[concepts], api_visibility="private", queue=False)
        fields["method"].change(method_shown, inputs=[fields["method"]],
                                outputs=[*groups, g_concepts, fields["target_guidance"]],
                                api_visibility="private", queue=False)
    return demo


def optional(fn, keywords) -> None:
    """fn's signature as Gradio reads it for the API: its **options as keyword parameters of default None, so that a
    client may leave out an option whose field starts empty (the command's default then)."""
    sig = inspect.signature(fn)
    head = [p if p.default is not p.empty or p.name == "photo" else p.replace(default=None)
            for p in sig.parameters.values() if p.kind is not p.VAR_KEYWORD]
    fn.__signature__ = sig.replace(parameters=head + [inspect.Parameter(k, inspect.Parameter.KEYWORD_ONLY, default=None)
                                                      for k in keywords])


def serve(app: App, host: str, port: int, max_file_size=MAX_UPLOAD_MB):
    """Serve the page until interrupted: one edit at a time (a queue shows a waiting user their place), never a
    share link, uploads up to max_file_size MB."""
    import gradio as gr
    demo = page(app)
    demo.queue(default_concurrency_limit=1)
    try:
        demo.launch(server_name=host, server_port=port, share=False, max_file_size=f"{max_file_size}mb", quiet=True,
                    show_error=True, ssr_mode=False, inbrowser=False, allowed_paths=[],
                    theme=gr.themes.Default(font=LOCAL_FONTS, font_mono=MONO))
    finally:  # SIGTERM's exit passes launch's own cleanup: stop the server before the temporary folder goes
        demo.close()
    return demo

