"""Shared medical knowledge: the knowledge base, report structure and the CheXpert-compatible labeler.

Re-exported here so callers write ``from mlip_fed.knowledge import label_report`` and do not
depend on how the subpackage is split into modules.
"""

from mlip_fed.knowledge.kb import CHEXPERT_CATEGORIES, Concept, KnowledgeBase, load_knowledge_base
from mlip_fed.knowledge.labeler import LabeledReport, extract_mentions, label_report, label_reports
from mlip_fed.knowledge.mentions import Mention
from mlip_fed.knowledge.report import Section, Sentence, split_clauses, split_report, split_sections, split_sentences

__all__ = [
    "CHEXPERT_CATEGORIES",
    "Concept",
    "KnowledgeBase",
    "LabeledReport",
    "Mention",
    "Section",
    "Sentence",
    "extract_mentions",
    "label_report",
    "label_reports",
    "load_knowledge_base",
    "split_clauses",
    "split_report",
    "split_sections",
    "split_sentences",
]
