"""VQA 2.0: answer classification over the most frequent train answers with soft targets
(min(1, annotators/3)) and BCE, scored exactly as the official evaluation scores it.

Files: the official questions JSON ({"data_subtype", "questions": [{"image_id", "question",
"question_id"}]}) and annotations JSON ({"annotations": [{"question_id", "answers": [{"answer"}]*10}]}).
Each split finds its own images: `task.image_pattern` may use {subtype}, the questions file's
data_subtype (train2014, val2014, test2015). The answer vocabulary is saved beside every
checkpoint (answer_vocab.json), so a finetuned model evaluates test-dev from its questions file
alone; without eval annotations, evaluation writes the results JSON the server accepts.
"""
from __future__ import annotations

import json
import logging
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F

from soho_ds import saved
from soho_ds.config import ConfigError, RunConfig, as_list
from soho_ds.models.heads import classifier_head
from soho_ds.runtime.trainer import to_device
from soho_ds.tasks.base import AnnotationError, ExampleTask, FinetuneModel, read_json, require

log = logging.getLogger(__name__)

# --- the official answer normalisation (VQA vqaEval.py, described in realdata's notes) ---
PUNCTUATION = [";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",",
               "?", "!"]
DIGIT_COMMA_DIGIT = re.compile(r"(\d)(,)(\d)")
IMAGE_FOLDERS = {"test-dev2015": "test2015"}  # test-dev is a subset of test: its images are test2015's
PERIOD = re.compile(r"(?!<=\d)(\.)(?!\d)")  # sic: the official look-behind is written as a look-ahead
NUMBER_WORDS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
                "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
ARTICLES = {"a", "an", "the"}
_CONTRACTION_PAIRS = """aint ain't|arent aren't|cant can't|couldve could've|couldnt couldn't|couldn'tve couldn't've|
couldnt've couldn't've|didnt didn't|doesnt doesn't|dont don't|hadnt hadn't|hadnt've hadn't've|hadn'tve hadn't've|
hasnt hasn't|havent haven't|hed he'd|hed've he'd've|he'dve he'd've|hes he's|howd how'd|howll how'll|hows how's|
Id've I'd've|I'dve I'd've|Im I'm|Ive I've|isnt isn't|itd it'd|itd've it'd've|it'dve it'd've|itll it'll|let's let's|
maam ma'am|mightnt mightn't|mightnt've mightn't've|mightn'tve mightn't've|mightve might've|mustnt mustn't|
mustve must've|neednt needn't|notve not've|oclock o'clock|oughtnt oughtn't|ow's'at 'ow's'at|'ows'at 'ow's'at|
'ow'sat 'ow's'at|shant shan't|shed've she'd've|she'dve she'd've|she's she's|shouldve should've|shouldnt shouldn't|
shouldnt've shouldn't've|shouldn'tve shouldn't've|somebody'd somebodyd|somebodyd've somebody'd've|
somebody'dve somebody'd've|somebodyll somebody'll|somebodys somebody's|someoned someone'd|someoned've someone'd've|
someone'dve someone'd've|someonell someone'll|someones someone's|somethingd something'd|
somethingd've something'd've|something'dve something'd've|somethingll something'll|thats that's|thered there'd|
thered've there'd've|there'dve there'd've|therere there're|theres there's|theyd they'd|theyd've they'd've|
they'dve they'd've|theyll they'll|theyre they're|theyve they've|twas 'twas|wasnt wasn't|wed've we'd've|
we'dve we'd've|weve we've|werent weren't|whatll what'll|whatre what're|whats what's|whatve what've|whens when's|
whered where'd|wheres where's|whereve where've|whod who'd|whod've who'd've|who'dve who'd've|wholl who'll|
whos who's|whove who've|whyll why'll|whyre why're|whys why's|wont won't|wouldve would've|wouldnt wouldn't|
wouldnt've wouldn't've|wouldn'tve wouldn't've|yall y'all|yall'll y'all'll|y'allll y'all'll|yall'd've y'all'd've|
y'alld've y'all'd've|y'all'dve y'all'd've|youd you'd|youd've you'd've|you'dve you'd've|youll you'll|
youre you're|youve you've"""
CONTRACTIONS = dict(pair.split(" ") for pair in _CONTRACTION_PAIRS.replace("\n", "").split("|"))


def _punctuation(text: str) -> str:
    out = text
    for p in PUNCTUATION:
        if (p + " " in text or " " + p in text) or DIGIT_COMMA_DIGIT.search(text) is not None:
            out = out.replace(p, "")
        else:
            out = out.replace(p, " ")
    return PERIOD.sub("", out, count=32)  # the official call caps it at 32 (re.UNICODE passed as count)


def _digits_articles(text: str) -> str:
    words = []
    for w in text.lower().split():
        w = NUMBER_WORDS.get(w, w)
        if w not in ARTICLES:
            words.append(w)
    return " ".join(CONTRACTIONS.get(w, w) for w in words)


def normalize_answer(answer: str) -> str:
    """Punctuation, then number words / articles / contractions, as the official evaluation does."""
    answer = answer.replace("\n", " ").replace("\t", " ").strip()
    return _digits_articles(_punctuation(answer))


def vqa_accuracy(prediction: str, answers: list[str]) -> float:
    """Official per-question accuracy: mean over the 10 leave-one-out subsets of min(1, matches/3).
    Normalisation applies only when the 10 answers are not all identical (current official code)."""
    gts = [a.replace("\n", " ").replace("\t", " ").strip() for a in answers]
    pred = prediction.replace("\n", " ").replace("\t", " ").strip()
    if len(set(gts)) > 1:
        gts = [normalize_answer(a) for a in gts]
        pred = normalize_answer(pred)
    scores = [min(1.0, sum(g == pred for j, g in enumerate(gts) if j != i) / 3) for i in range(len(gts))]
    return sum(scores) / len(scores)


# --- data ---
@dataclass(frozen=True)
class VQAQuestion:
    question_id: int
    image_id: int
    question: str
    answers: tuple[str, ...] | None  # 10 annotator answers; None for test questions
    subtype: str = ""  # the questions file's data_subtype, e.g. "val2014": where its images are




def read_vqa(questions_path: str | Path, annotations_path: str | Path | None) -> list[VQAQuestion]:
    qs = read_json(questions_path)
    if not isinstance(qs, dict) or not isinstance(qs.get("questions"), list):
        raise AnnotationError(f"{questions_path}: expected the official layout with a 'questions' list")
    subtype = str(qs.get("data_subtype", ""))
    answers: dict[int, tuple[str, ...]] = {}
    if annotations_path:
        anns = read_json(annotations_path)
        if not isinstance(anns, dict) or not isinstance(anns.get("annotations"), list):
            raise AnnotationError(f"{annotations_path}: expected the official layout with an 'annotations' list")
        for i, a in enumerate(anns["annotations"]):
            where = f"{annotations_path}: annotations[{i}]"
            require(a, ("question_id", "answers"), where)
            if not a["answers"] or not all(isinstance(x, dict) and "answer" in x for x in a["answers"]):
                raise AnnotationError(f"{where} (question {a['question_id']}): 'answers' must be a list of "
                                      "{'answer': ...} objects")
            answers[a["question_id"]] = tuple(x["answer"] for x in a["answers"])
    out = []
    for i, q in enumerate(qs["questions"]):
        require(q, ("question_id", "image_id", "question"), f"{questions_path}: questions[{i}]")
        if annotations_path and q["question_id"] not in answers:
            raise AnnotationError(f"{annotations_path}: no annotation for question {q['question_id']}")
        out.append(VQAQuestion(q["question_id"], q["image_id"], q["question"], answers.get(q["question_id"]),
                               subtype))
    return out


def _ranked(counts: Counter) -> list[str]:
    """Answers by decreasing count, ties broken alphabetically (deterministic across runs)."""
    return [a for a, _ in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))]


def build_answer_vocab(questions: list[VQAQuestion], size: int) -> list[str]:
    """The `size` most frequent normalised answers (all 10 per question), ties broken alphabetically."""
    unanswered = [q.question_id for q in questions if q.answers is None]
    if unanswered:
        raise AnnotationError(f"{len(unanswered)} of {len(questions)} questions have no answers (question "
                              f"{unanswered[0]} first): the answer vocabulary is built from annotated questions; "
                              "give task.train_answers, the annotations of task.train_file")
    return _ranked(Counter(normalize_answer(a) for q in questions for a in q.answers))[:size]


def question_prior_accuracy(train: list[VQAQuestion], evaluated: list[VQAQuestion]) -> float:
    """VQA accuracy (%) of a blind model: each question answered with the most frequent training
    answer to the same (lower-cased) question text, else the most frequent answer overall.
    A model that does not beat this has learned the language prior, not to look at the image."""
    by_question: dict[str, Counter] = {}
    for q in train:
        by_question.setdefault(q.question.strip().lower(), Counter()).update(normalize_answer(a) for a in q.answers)
    overall = build_answer_vocab(train, 1)[0]

    def guess(q: VQAQuestion) -> str:
        counts = by_question.get(q.question.strip().lower())
        return _ranked(counts)[0] if counts else overall

    return 100 * sum(vqa_accuracy(guess(q), list(q.answers)) for q in evaluated) / len(evaluated)


def soft_targets(answers: tuple[str, ...], vocab_index: dict[str, int]) -> torch.Tensor:
    """min(1, annotators who gave the answer / 3) for each vocabulary answer."""
    target = torch.zeros(len(vocab_index))
    for answer, count in Counter(normalize_answer(a) for a in answers).items():
        if answer in vocab_index:
            target[vocab_index[answer]] = min(1.0, count / 3)
    return target


class VQAModel(FinetuneModel):
    def __init__(self, cfg: RunConfig, num_answers: int):
        super().__init__(cfg)
        h = self.model.hidden_size
        self.head = classifier_head(cfg.task.head, h, h, num_answers, cfg.task.head_dropout)

    def logits(self, batch) -> torch.Tensor:
        return self.head(self.encode(batch, batch["input_ids"], batch["attention_mask"])).float()

    def forward(self, batch):
        logits = self.logits(batch)
        target = batch["targets"].float()
        # BCE summed over answers (mean x number of answers), as UNITER/ViLT.
        loss = F.binary_cross_entropy_with_logits(logits, target) * target.shape[1]
        score = target.gather(1, logits.argmax(1, keepdim=True)).mean()  # VQA score vs soft targets
        return {"loss": loss, "loss/vqa": loss, "acc/vqa_soft": score}


class VQATask(ExampleTask):
    name = "vqa"
    model_class = VQAModel

    def __init__(self, cfg: RunConfig, dist_info, micro_batch: int, init: str | None = None):
        super().__init__(cfg, dist_info, micro_batch, init)
        t = cfg.task
        files = lambda q: [self.image_name(q)]  # noqa: E731
        # questions without their annotations cannot train (or build a vocabulary): evaluation only
        train = []
        if t.train_file and t.train_answers:  # several pairs: their union (SOHO trains test-dev models on train+val)
            for questions, answers in zip(as_list(t.train_file), as_list(t.train_answers)):
                train += self.keep_present(read_vqa(questions, answers), files, questions)
        saved_vocab = saved.read(init).vocab if init else None
        if saved_vocab is not None:
            self.vocab = saved_vocab  # the head's answers: the checkpoint's, whatever the train files say now
        elif train:
            self.vocab = build_answer_vocab(train, t.num_answers)
        else:
            raise AnnotationError(f"{cfg.source}: no answer vocabulary: give task.train_file and task.train_answers, "
                                  f"or --init a VQA checkpoint (it carries {saved.ANSWER_VOCAB})")
        self.vocab_index = {a: i for i, a in enumerate(self.vocab)}
        self.train_examples = train
        self.eval_questions = self.keep_present(read_vqa(t.eval_file, t.eval_answers), files, t.eval_file)
        log.info("VQA: %d train questions, %d answers in the vocabulary%s, %d eval questions", len(train),
                 len(self.vocab), " (from the checkpoint)" if saved_vocab is not None else "", len(self.eval_questions))

    def eval_items(self) -> list:
        return self.eval_questions

    def chance(self) -> dict[str, float]:
        """Always answering the most frequent training answer."""
        if self.eval_questions[0].answers is None:
            return {}
        top = self.vocab[0]
        return {"vqa_accuracy": 100 * sum(vqa_accuracy(top, list(q.answers)) for q in self.eval_questions)
                / len(self.eval_questions)}

    def blind_baselines(self) -> dict[str, float]:
        if self.eval_questions[0].answers is None or not self.train_examples:
            return {}
        return {"vqa_accuracy": question_prior_accuracy(self.train_examples, self.eval_questions)}

    def checkpoint_files(self) -> dict[str, str]:
        return saved.task_files(self.vocab)

    @classmethod
    def build_model(cls, cfg: RunConfig, vocab: list[str] | None = None) -> VQAModel:
        if vocab is None:
            raise ConfigError(f"{cfg.source}: a VQA model needs its answer vocabulary "
                              f"({saved.ANSWER_VOCAB} beside it)")
        return VQAModel(cfg, len(vocab))

    def make_model(self) -> VQAModel:
        return self.build_model(self.cfg, self.vocab)

    def image_name(self, q: VQAQuestion) -> str:
        return self.cfg.task.image_pattern.format(image_id=q.image_id, subtype=IMAGE_FOLDERS.get(q.subtype, q.subtype))

    def image_names(self, examples: list[VQAQuestion]) -> list[str]:
        return [self.image_name(q) for q in examples]

    def collate(self, examples: list[VQAQuestion], train: bool, images: dict):
        batch = self.tokenize([q.question for q in examples])
        batch.update(images)
        if examples[0].answers is not None:
            batch["targets"] = torch.stack([soft_targets(q.answers, self.vocab_index) for q in examples])
        return batch

    @torch.no_grad()
    def predict(self, module, device, dtype) -> dict[int, str]:
        was_training = module.training
        module.eval()
        mine = [self.eval_questions[i] for i in self.eval_slice(len(self.eval_questions))]
        preds = {}
        for chunk, batch in self.eval_batches(mine):
            batch = to_device(batch, device, dtype)
            for q, a in zip(chunk, module.logits(batch).argmax(1).tolist()):
                preds[q.question_id] = self.vocab[a]
        module.train(was_training)
        if dist.is_initialized() and dist.get_world_size() > 1:
            gathered = [None] * dist.get_world_size()
            dist.all_gather_object(gathered, preds)
            preds = {k: v for part in gathered for k, v in part.items()}
        return preds

    def evaluate(self, module, device, dtype) -> dict[str, float]:
        preds = self.predict(module, device, dtype)
        results = [{"question_id": q, "answer": a} for q, a in sorted(preds.items())]
        if self.dist.is_main:
            path = Path(self.cfg.train.output_dir) / "vqa_results.json"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(results))  # the evaluation server's format
            log.info("VQA: %d answers written to %s (the evaluation server's format)", len(results), path)
        if self.eval_questions[0].answers is None:
            return {"num_questions": float(len(results))}
        acc = [vqa_accuracy(preds[q.question_id], list(q.answers)) for q in self.eval_questions]
        return {"vqa_accuracy": 100 * sum(acc) / len(acc), "num_questions": float(len(acc))}
