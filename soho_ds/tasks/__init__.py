"""The downstream tasks, one module each (reader, head, loss, metric); TASKS is their one list."""
from soho_ds.tasks.nlvr2 import NLVR2Task
from soho_ds.tasks.retrieval import RetrievalTask
from soho_ds.tasks.snli_ve import SNLIVETask
from soho_ds.tasks.vqa import VQATask

TASKS = {task.name: task for task in (RetrievalTask, VQATask, NLVR2Task, SNLIVETask)}
