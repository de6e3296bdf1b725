"""Fine-tuning sets written from the synthetic world (shapes.py), one of each kind finetune.py reads: VQA questions
about one-object scenes (a JSONL manifest with ten annotator answers a question), an image folder per class, and
a sentence-pair text task. Small enough to fine-tune the default run on in minutes on a CPU.

Companion of finetune.py (tasks.py reads what this writes).

    python shapes_tasks.py vqa data/shapes-vqa         # 4,000 one-object scenes, 40,000 questions
    python shapes_tasks.py images data/shapes-images   # an image folder per (colour, shape): train/ val/
    python shapes_tasks.py text data/shapes-text       # caption<TAB>statement pairs: entailment or not
"""
import argparse
import collections
import json
import os
import random

from PIL import Image

import shapes


W = shapes.ShapesWorld
# Question templates about a one-object scene; {c} its colour, {s} its shape, {z} its size. Answer kinds:
# colour, shape, size (open), and yes/no questions that state something true or, half the time, false.
QUESTIONS = {
    "colour": ("what colour is the {s}?", "what color is the object?", "what colour is it?",
               "which colour does the {s} have?", "what is the color of the shape?"),
    "shape": ("what shape is this?", "what shape is the {c} object?", "which shape is in the picture?",
              "what is the {c} thing?"),
    "size": ("is the {s} small or large?", "how big is the {c} {s}?", "what size is the {c} shape?"),
    "yes/no": ("is there a {c} {s}?", "is the {s} {c}?", "is it a {s}?", "is the object {z}?",
               "is this a {z} {s}?"),
}
KIND_SHARE = {"colour": 0.25, "shape": 0.25, "size": 0.15, "yes/no": 0.35}  # VQAv2: 38% of questions are yes/no


def annotators(answer, synonyms, rng, n=10):
    """Ten annotators' answers: a word with synonyms (circle / disc, large / big) is said a quarter of the time
    as its synonym, as VQAv2's annotators disagree in words, not in fact."""
    return [rng.choice(synonyms) if synonyms and rng.random() < 0.25 else answer for _ in range(n)]


def ask(o, rng):
    """One question about the object o -> (question, kind, annotator answers). A false yes/no question changes
    one attribute the template names to another value."""
    kind = rng.choices(list(KIND_SHARE), list(KIND_SHARE.values()))[0]
    template = rng.choice(QUESTIONS[kind])
    fill = {"c": o["colour"], "s": o["shape"], "z": o["size"]}
    if kind == "yes/no":
        true = rng.random() < 0.5
        if not true:
            key = rng.choice([k for k in "csz" if "{" + k + "}" in template])
            values = {"c": W.COLOURS, "s": W.SHAPES, "z": ("small", "large")}[key]
            fill[key] = rng.choice([v for v in values if v != fill[key]])
        return template.format(**fill), kind, annotators("yes" if true else "no", (), rng)
    answer = {"colour": o["colour"], "shape": o["shape"], "size": o["size"]}[kind]
    words = {**W.SHAPE_WORDS, **W.SIZE_WORDS}.get(answer, (answer,))
    return template.format(**fill), kind, annotators(answer, words[1:], rng)


def write_shapes_vqa(out, n_images=4000, per_image=10, val_share=0.1, image_size=64, seed=0):
    """One-object scenes of every (colour, shape) as PNG files, per_image questions each -> train.jsonl and
    val.jsonl (images of val are never seen in training)."""
    world, rng = W(image_size=image_size, seed=seed), random.Random(f"{seed}/shapes-vqa")
    every = [(c, s) for c in W.COLOURS for s in W.SHAPES]
    n_val = round(n_images * val_share)
    for split, first, n in (("train", 0, n_images - n_val), ("val", n_images - n_val, n_val)):
        os.makedirs(os.path.join(out, "images", split), exist_ok=True)
        with open(os.path.join(out, f"{split}.jsonl"), "w") as f:
            for i in range(first, first + n):
                scene = world.single(split, i, *rng.choice(every))
                name = f"images/{split}/{i:05d}.png"
                Image.fromarray(world.render(scene)).save(os.path.join(out, name))
                asked = set()
                while len(asked) < per_image:  # distinct questions per image
                    q, kind, answers = ask(scene["objects"][0], rng)
                    if q not in asked:
                        asked.add(q)
                        top = collections.Counter(answers).most_common(1)[0][0]
                        f.write(json.dumps({"image": name, "question": q, "answer": top, "answers": answers,
                                            "kind": kind}) + "\n")
    return n_images * per_image


def write_shapes_images(out, per_class=(100, 25), image_size=64, seed=0):
    """An image folder per (colour, shape) class, train/ and val/, one object a scene."""
    world = W(image_size=image_size, seed=seed)
    for split, n in zip(("train", "val"), per_class):
        for c, s in ((c, s) for c in W.COLOURS for s in W.SHAPES):
            os.makedirs(folder := os.path.join(out, split, f"{c}_{s}"), exist_ok=True)
            for j in range(n):
                Image.fromarray(world.render(world.single(split, j, c, s))).save(os.path.join(folder, f"{j:04d}.png"))


def write_shapes_text(out, n=(8000, 1000), seed=0):
    """A GLUE-style sentence-pair task (RTE, SNLI): a caption, a statement, and whether the caption entails it
    ("there is a red circle" after "a red disc above a blue box") or contradicts it (a colour or shape the
    caption does not pair)."""
    world = W(seed=seed)
    statements = ("there is a {} {}.", "the picture shows a {} {}.", "a {} {} can be seen.")
    for split, count in zip(("train", "val"), n):
        rng = random.Random(f"{seed}/{split}/shapes-text")
        with open(os.path.join(out, f"{split}.tsv"), "w") as f:
            for i in range(count):
                scene = world.scene(split, i)
                present = {(o["colour"], o["shape"]) for o in scene["objects"]}
                true = rng.random() < 0.5
                pick = rng.choice(sorted(present) if true else [p for p in ((c, s) for c in W.COLOURS
                                                                            for s in W.SHAPES) if p not in present])
                f.write(f"{'entailment' if true else 'contradiction'}\t{world.caption(scene, rng)}\t"
                        f"{rng.choice(statements).format(*pick)}\n")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("command", choices=["vqa", "images", "text"])
    parser.add_argument("out", help="the folder to write (created)")
    parser.add_argument("--images", type=int, default=4000, help="vqa: one-object scenes")
    parser.add_argument("--per_image", type=int, default=10, help="vqa: questions per scene")
    parser.add_argument("--image_size", type=int, default=64, help="pixels a side (the model resizes to its own)")
    parser.add_argument("--seed", type=int, default=0, help="the world's seed and the questions'")
    args = parser.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    if args.command == "vqa":
        n = write_shapes_vqa(args.out, args.images, args.per_image, image_size=args.image_size, seed=args.seed)
        print(f"wrote {n} questions about {args.images} images: {args.out}/train.jsonl, {args.out}/val.jsonl")
    elif args.command == "images":
        write_shapes_images(args.out, image_size=args.image_size, seed=args.seed)
        print(f"wrote {args.out}/train and {args.out}/val, {len(W.COLOURS) * len(W.SHAPES)} classes")
    else:
        write_shapes_text(args.out, seed=args.seed)
        print(f"wrote {args.out}/train.tsv and {args.out}/val.tsv")


if __name__ == "__main__":
    main()
