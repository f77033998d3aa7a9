"""Seeded generator of pseudo-clinical notes (private) and medical reference text (public).

Why it exists: the pipeline needs sensitive-looking text with a learnable signal
(diagnosis -> first-line medication) and fake identifiers, without touching real patient data.
Every identifier (names, MRNs, addresses, dates) is drawn at random from embedded fake lists, so
no note describes a real person. The public corpus is written in a different register
(encyclopaedic, no patients) so it can pretrain a base model without leaking the private split.

Both generators are deterministic: the same ``(n, seed)`` always gives the same output, and a
shorter run is a prefix of a longer one with the same seed.
"""

from __future__ import annotations

import datetime as dt
import random
from collections.abc import Sequence
from dataclasses import dataclass

NOTE_TYPES: tuple[str, ...] = ("discharge_summary", "progress_note", "referral_letter")

# ---------------------------------------------------------------------------------------------
# Reference tables: labs and vital signs
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LabTest:
    """A laboratory test with its adult reference range and the spread of normal values.

    Normal values are drawn from N(mean, sd) and clipped to [floor, ceiling]; conditions shift
    the mean so that a model (and a test) can see the direction typical for a disease.
    """

    label: str  # how the test is written in a note, e.g. "HbA1c"
    unit: str  # appended verbatim after the value (leading space where one is written)
    ref_low: float
    ref_high: float
    mean: float
    sd: float
    decimals: int
    floor: float
    ceiling: float
    description: str  # what the test measures (public corpus)

    def format(self, value: float) -> str:
        """Render ``value`` the way a clinician writes it, e.g. ``HbA1c 8.4%``."""
        return f"{self.label} {value:.{self.decimals}f}{self.unit}"


LABS: dict[str, LabTest] = {
    "hba1c": LabTest(
        "HbA1c", "%", 4.0, 6.0, 5.4, 0.3, 1, 4.0, 15.0,
        "reflects average blood glucose over the preceding two to three months",
    ),
    "glucose": LabTest(
        "fasting glucose", " mmol/L", 3.9, 5.6, 5.1, 0.4, 1, 3.0, 30.0,
        "measures plasma glucose after at least eight hours without food",
    ),
    "wbc": LabTest(
        "WBC", " x10^9/L", 4.0, 11.0, 7.0, 1.4, 1, 2.0, 40.0,
        "counts circulating white blood cells and rises with bacterial infection",
    ),
    "crp": LabTest(
        "CRP", " mg/L", 0.0, 5.0, 3.0, 1.5, 0, 1.0, 400.0,
        "is an acute-phase protein made by the liver in response to inflammation",
    ),
    "hb": LabTest(
        "Hb", " g/L", 120.0, 170.0, 140.0, 10.0, 0, 60.0, 190.0,
        "measures the haemoglobin concentration of whole blood",
    ),
    "mcv": LabTest(
        "MCV", " fL", 80.0, 100.0, 90.0, 4.0, 0, 55.0, 130.0,
        "is the mean corpuscular volume, the average size of red blood cells",
    ),
    "ferritin": LabTest(
        "ferritin", " ug/L", 30.0, 300.0, 110.0, 50.0, 0, 2.0, 900.0,
        "reflects total body iron stores",
    ),
    "b12": LabTest(
        "vitamin B12", " ng/L", 200.0, 900.0, 420.0, 110.0, 0, 40.0, 1500.0,
        "measures serum cobalamin, needed for red cell production and nerve function",
    ),
    "tsh": LabTest(
        "TSH", " mU/L", 0.4, 4.0, 1.9, 0.7, 2, 0.01, 100.0,
        "is thyroid-stimulating hormone, the most sensitive screening test of thyroid function",
    ),
    "ft4": LabTest(
        "free T4", " pmol/L", 10.0, 22.0, 15.5, 2.2, 1, 2.0, 80.0,
        "measures unbound thyroxine, the main hormone secreted by the thyroid gland",
    ),
    "sodium": LabTest(
        "Na", " mmol/L", 135.0, 145.0, 139.5, 2.2, 0, 115.0, 160.0,
        "measures serum sodium, the main determinant of plasma osmolality",
    ),
    "potassium": LabTest(
        "K", " mmol/L", 3.5, 5.3, 4.3, 0.3, 1, 2.5, 7.0,
        "measures serum potassium, which is critical for cardiac rhythm",
    ),
    "creatinine": LabTest(
        "creatinine", " umol/L", 60.0, 110.0, 82.0, 13.0, 0, 35.0, 900.0,
        "is a muscle breakdown product cleared by the kidneys and used to estimate kidney function",
    ),
    "egfr": LabTest(
        "eGFR", " mL/min/1.73m2", 60.0, 120.0, 88.0, 9.0, 0, 5.0, 120.0,
        "is the estimated glomerular filtration rate calculated from creatinine, age and sex",
    ),
    "ldl": LabTest(
        "LDL cholesterol", " mmol/L", 0.0, 3.0, 2.7, 0.5, 1, 0.8, 9.0,
        "measures low-density lipoprotein cholesterol, the main target of lipid-lowering therapy",
    ),
    "chol": LabTest(
        "total cholesterol", " mmol/L", 0.0, 5.0, 4.7, 0.6, 1, 2.0, 12.0,
        "measures all cholesterol carried in the blood",
    ),
    "ntprobnp": LabTest(
        "NT-proBNP", " ng/L", 0.0, 125.0, 70.0, 30.0, 0, 5.0, 35000.0,
        "is released by stretched ventricular muscle and is used to rule out heart failure",
    ),
    "ddimer": LabTest(
        "D-dimer", " ng/mL FEU", 0.0, 500.0, 280.0, 100.0, 0, 50.0, 20000.0,
        "is a fibrin degradation product; a normal value helps exclude venous thrombosis",
    ),
    "urate": LabTest(
        "urate", " umol/L", 200.0, 420.0, 310.0, 45.0, 0, 120.0, 900.0,
        "measures serum uric acid, the end product of purine metabolism",
    ),
    "esr": LabTest(
        "ESR", " mm/h", 0.0, 20.0, 9.0, 4.0, 0, 1.0, 140.0,
        "is the erythrocyte sedimentation rate, a non-specific marker of inflammation",
    ),
    "eos": LabTest(
        "eosinophils", " x10^9/L", 0.0, 0.5, 0.2, 0.08, 2, 0.01, 3.0,
        "counts eosinophils, white cells that increase in allergy and asthma",
    ),
    "psa": LabTest(
        "PSA", " ug/L", 0.0, 4.0, 1.4, 0.7, 1, 0.1, 100.0,
        "is prostate-specific antigen, raised by prostate enlargement, infection or cancer",
    ),
    "vitd": LabTest(
        "25-OH vitamin D", " nmol/L", 50.0, 150.0, 68.0, 14.0, 0, 5.0, 250.0,
        "measures the main circulating form of vitamin D",
    ),
    "troponin": LabTest(
        "hs-troponin T", " ng/L", 0.0, 14.0, 6.0, 3.0, 0, 3.0, 5000.0,
        "is released by injured heart muscle and is central to diagnosing myocardial infarction",
    ),
    "platelets": LabTest(
        "platelets", " x10^9/L", 150.0, 400.0, 260.0, 45.0, 0, 20.0, 900.0,
        "counts platelets, the cell fragments that start blood clotting",
    ),
    "calcium": LabTest(
        "adjusted calcium", " mmol/L", 2.2, 2.6, 2.38, 0.07, 2, 1.6, 3.5,
        "measures serum calcium corrected for the albumin concentration",
    ),
    "phq9": LabTest(
        "PHQ-9 score", "/27", 0.0, 4.0, 3.0, 2.0, 0, 0.0, 27.0,
        "is a nine-item questionnaire that grades the severity of depressive symptoms",
    ),
    "gad7": LabTest(
        "GAD-7 score", "/21", 0.0, 4.0, 3.0, 2.0, 0, 0.0, 21.0,
        "is a seven-item questionnaire that grades the severity of anxiety",
    ),
    "pef": LabTest(
        "peak flow", "% predicted", 80.0, 120.0, 96.0, 7.0, 0, 20.0, 130.0,
        "measures peak expiratory flow as a percentage of the value predicted for height and age",
    ),
}  # fmt: skip

# Labs that may be added to any note as a normal "routine" result, so that condition-specific
# labs can be compared against values from notes of other conditions.
ROUTINE_LABS: tuple[str, ...] = (
    "hb", "wbc", "platelets", "sodium", "potassium", "creatinine", "crp", "hba1c", "tsh",
)  # fmt: skip


@dataclass(frozen=True)
class VitalSign:
    """A vital sign with the spread of normal resting values (conditions shift the mean)."""

    label: str
    mean: float
    sd: float
    decimals: int
    floor: float
    ceiling: float
    normal: str  # normal adult range in words (public corpus)
    description: str


VITALS: dict[str, VitalSign] = {
    "sbp": VitalSign(
        "systolic blood pressure", 126.0, 11.0, 0, 85.0, 230.0, "90 to 139 mmHg",
        "is the peak arterial pressure during ventricular contraction",
    ),
    "dbp": VitalSign(
        "diastolic blood pressure", 78.0, 7.0, 0, 45.0, 135.0, "60 to 89 mmHg",
        "is the arterial pressure while the heart relaxes between beats",
    ),
    "hr": VitalSign(
        "heart rate", 76.0, 8.0, 0, 38.0, 180.0, "60 to 100 beats per minute",
        "is the number of ventricular contractions per minute",
    ),
    "temp": VitalSign(
        "body temperature", 36.8, 0.25, 1, 35.0, 41.0, "36.1 to 37.5 degrees Celsius",
        "is usually measured at the ear, mouth or axilla",
    ),
    "spo2": VitalSign(
        "oxygen saturation", 97.6, 1.1, 0, 78.0, 100.0, "95 to 100 percent on room air",
        "is the proportion of haemoglobin carrying oxygen, measured by pulse oximetry",
    ),
    "rr": VitalSign(
        "respiratory rate", 15.0, 1.8, 0, 9.0, 40.0, "12 to 20 breaths per minute",
        "is the number of breaths per minute counted over a full minute at rest",
    ),
}  # fmt: skip


# ---------------------------------------------------------------------------------------------
# Clinical knowledge base
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Condition:
    """One entry of the embedded clinical knowledge base.

    ``labs`` and ``vitals`` hold ``(key, mean, sd)`` overrides of the normal distributions in
    ``LABS`` and ``VITALS``; this is what makes values shift in the direction typical for the
    disease. ``dose_overrides`` restricts a shared drug to the doses used for this condition.
    """

    icd10: str
    name: str
    medications: tuple[str, ...]
    specialty: str
    complaints: tuple[str, ...]  # chief complaint phrases
    symptoms: tuple[str, ...]  # history phrases, joined as a list
    duration_days: tuple[int, int]  # typical symptom duration before the encounter
    definition: str  # public corpus: "X is <definition>."
    diagnosis_basis: str  # public corpus: how the diagnosis is made (a full sentence)
    labs: tuple[tuple[str, float, float], ...] = ()
    vitals: tuple[tuple[str, float, float], ...] = ()
    findings: tuple[str, ...] = ()  # examination findings
    background: tuple[str, ...] = ()  # risk factors / relevant history
    female_background: tuple[str, ...] = ()  # background items that only apply to women
    plan: tuple[str, ...] = ()  # non-drug plan items (full sentences)
    follow_up: tuple[str, ...] = ("review in 4 weeks",)
    inpatient: bool = False  # whether a hospital admission (discharge summary) is plausible
    sex: str | None = None  # "F" or "M" when the condition is restricted to one sex
    age_range: tuple[int, int] = (25, 85)
    dose_overrides: tuple[tuple[str, tuple[str, ...]], ...] = ()

    def doses(self, medication: str) -> tuple[str, ...]:
        """Dose strings appropriate to this condition (a subset of ``MEDICATIONS[medication]``)."""
        for name, doses in self.dose_overrides:
            if name == medication:
                return doses
        return MEDICATIONS[medication]


MEDICATIONS: dict[str, tuple[str, ...]] = {
    "aciclovir": ("800 mg PO five times daily for 7 days",),
    "alendronic acid": ("70 mg PO once weekly",),
    "amlodipine": ("5 mg PO once daily", "10 mg PO once daily"),
    "amoxicillin": ("500 mg PO TID for 5 days", "1 g PO TID for 5 days"),
    "apixaban": (
        "5 mg PO BID",
        "2.5 mg PO BID",
        "10 mg PO BID for 7 days then 5 mg PO BID",
    ),
    "aspirin": ("75 mg PO once daily",),
    "beclometasone": ("100 micrograms 2 puffs inhaled BID", "200 micrograms 1 puff inhaled BID"),
    "bisoprolol": ("1.25 mg PO once daily", "2.5 mg PO once daily", "5 mg PO once daily"),
    "carbimazole": ("20 mg PO once daily", "40 mg PO once daily"),
    "cetirizine": ("10 mg PO once daily",),
    "citalopram": ("10 mg PO once daily", "20 mg PO once daily"),
    "co-careldopa": ("12.5/50 mg PO TID", "25/100 mg PO TID"),
    "colchicine": ("500 micrograms PO BID for up to 5 days", "500 micrograms PO TID for 4 days"),
    "colecalciferol": ("20,000 units PO once weekly for 7 weeks", "800 units PO once daily"),
    "dapagliflozin": ("10 mg PO once daily",),
    "doxycycline": (
        "200 mg PO on day 1 then 100 mg once daily for 5 days in total",
        "100 mg PO BID for 5 days",
    ),
    "empagliflozin": ("10 mg PO once daily",),
    "ferrous sulfate": ("200 mg PO once daily", "200 mg PO on alternate days"),
    "flucloxacillin": ("500 mg PO QID for 5 days", "1 g PO QID for 7 days"),
    "furosemide": ("40 mg IV BID", "40 mg PO once daily", "20 mg PO once daily"),
    "glyceryl trinitrate": ("400 micrograms sublingual spray PRN for chest pain",),
    "hydrocortisone": ("1% cream applied thinly BID for 7 days",),
    "hydroxocobalamin": (
        "1 mg IM three times a week for 2 weeks, then every 3 months",
        "1 mg IM every 3 months after loading doses",
    ),
    "ibuprofen": ("400 mg PO TID with food", "200 mg PO TID PRN with food"),
    "lactulose": ("15 mL PO BID",),
    "lamotrigine": ("25 mg PO once daily for 2 weeks then 50 mg once daily",),
    "lansoprazole": ("30 mg PO once daily", "15 mg PO once daily"),
    "levetiracetam": ("250 mg PO BID", "500 mg PO BID"),
    "levothyroxine": (
        "25 micrograms PO once daily",
        "50 micrograms PO once daily",
        "75 micrograms PO once daily",
    ),
    "lisinopril": ("10 mg PO once daily", "20 mg PO once daily"),
    "macrogol": ("1 sachet PO once daily", "1 to 3 sachets PO daily in divided doses"),
    "metformin": ("500 mg PO once daily with breakfast", "500 mg PO BID", "1000 mg PO BID"),
    "methotrexate": ("7.5 mg PO once weekly", "10 mg PO once weekly"),
    "mometasone": ("50 micrograms 2 sprays into each nostril once daily",),
    "naproxen": ("500 mg PO BID with food", "250 mg PO TID with food"),
    "nitrofurantoin": ("100 mg modified-release PO BID for 3 days", "50 mg PO QID for 3 days"),
    "omeprazole": ("20 mg PO once daily", "40 mg PO once daily"),
    "paracetamol": ("1 g PO QID PRN", "500 mg PO QID PRN"),
    "phenoxymethylpenicillin": ("500 mg PO QID for 10 days", "1 g PO BID for 10 days"),
    "prednisolone": ("30 mg PO once daily for 5 days", "40 mg PO once daily for 5 days"),
    "propranolol": ("40 mg PO BID", "80 mg modified-release PO once daily"),
    "ramipril": ("2.5 mg PO once daily", "5 mg PO once daily", "10 mg PO once daily"),
    "rivaroxaban": ("15 mg PO BID for 21 days then 20 mg PO once daily",),
    "salbutamol": (
        "100 micrograms 2 puffs inhaled PRN",
        "100 micrograms 1 to 2 puffs inhaled QID PRN",
    ),
    "sertraline": ("50 mg PO once daily", "25 mg PO once daily"),
    "simvastatin": ("20 mg PO once nightly", "40 mg PO once nightly"),
    "sumatriptan": ("50 mg PO at onset of headache", "100 mg PO at onset of headache"),
    "tamsulosin": ("400 micrograms PO once daily",),
    "trimethoprim": ("200 mg PO BID for 3 days", "200 mg PO BID for 7 days"),
    "atorvastatin": ("20 mg PO once daily", "80 mg PO once daily"),
}  # fmt: skip

ALL_MEDICATION_NAMES: tuple[str, ...] = tuple(sorted(MEDICATIONS))


@dataclass(frozen=True)
class DrugInfo:
    """Monograph facts for the public corpus (class, adverse effects, one caution)."""

    drug_class: str
    adverse_effects: tuple[str, ...]
    caution: str


DRUGS: dict[str, DrugInfo] = {
    "aciclovir": DrugInfo(
        "nucleoside analogue antiviral", ("nausea", "headache", "renal impairment at high doses"),
        "It works best when started within 72 hours of the onset of the rash.",
    ),
    "alendronic acid": DrugInfo(
        "bisphosphonate", ("oesophagitis", "dyspepsia", "rarely osteonecrosis of the jaw"),
        "Tablets are swallowed with water on an empty stomach, staying upright for 30 minutes.",
    ),
    "amlodipine": DrugInfo(
        "dihydropyridine calcium-channel blocker", ("ankle oedema", "flushing", "headache"),
        "It is often chosen first in people of African or Caribbean family origin.",
    ),
    "amoxicillin": DrugInfo(
        "aminopenicillin antibiotic", ("diarrhoea", "nausea", "rash"),
        "It must not be given to people with a history of penicillin allergy.",
    ),
    "apixaban": DrugInfo(
        "direct oral anticoagulant (factor Xa inhibitor)", ("bleeding", "anaemia", "nausea"),
        "A lower dose is used in older, low-weight people with impaired renal function.",
    ),
    "aspirin": DrugInfo(
        "antiplatelet agent", ("dyspepsia", "gastrointestinal bleeding", "bruising"),
        "It is avoided in active peptic ulceration and used with care in asthma.",
    ),
    "atorvastatin": DrugInfo(
        "HMG-CoA reductase inhibitor (statin)", ("myalgia", "raised transaminases", "dyspepsia"),
        "Lipids and liver enzymes are rechecked about three months after starting.",
    ),
    "beclometasone": DrugInfo(
        "inhaled corticosteroid", ("oral candidiasis", "hoarse voice", "cough"),
        "Rinsing the mouth after each dose reduces the risk of oral thrush.",
    ),
    "bisoprolol": DrugInfo(
        "cardioselective beta-blocker", ("fatigue", "bradycardia", "cold extremities"),
        "In heart failure it is started at a low dose and titrated slowly.",
    ),
    "carbimazole": DrugInfo(
        "thionamide antithyroid drug", ("rash", "nausea", "rarely agranulocytosis"),
        "Anyone taking it should report a sore throat or fever urgently.",
    ),
    "cetirizine": DrugInfo(
        "second-generation antihistamine", ("drowsiness", "dry mouth", "headache"),
        "It causes less sedation than older antihistamines.",
    ),
    "citalopram": DrugInfo(
        "selective serotonin reuptake inhibitor", ("nausea", "QT prolongation", "hyponatraemia"),
        "The maximum dose is lower in people over 65 because of QT prolongation.",
    ),
    "co-careldopa": DrugInfo(
        "levodopa combined with a dopa-decarboxylase inhibitor",
        ("nausea", "postural hypotension", "dyskinesia"),
        "It must not be stopped abruptly because of the risk of a neuroleptic-like syndrome.",
    ),
    "colchicine": DrugInfo(
        "anti-inflammatory alkaloid", ("diarrhoea", "nausea", "vomiting"),
        "Its dose is limited by gastrointestinal toxicity and reduced in renal impairment.",
    ),
    "colecalciferol": DrugInfo(
        "vitamin D3 supplement", ("hypercalcaemia with excessive doses", "nausea", "constipation"),
        "Calcium is checked about a month after completing a loading regimen.",
    ),
    "dapagliflozin": DrugInfo(
        "sodium-glucose co-transporter 2 (SGLT2) inhibitor",
        ("genital fungal infection", "urinary tract infection", "volume depletion"),
        "In chronic kidney disease it slows the decline in kidney function.",
    ),
    "doxycycline": DrugInfo(
        "tetracycline antibiotic", ("photosensitivity", "oesophageal irritation", "nausea"),
        "Capsules are swallowed upright with plenty of water; it is avoided in pregnancy.",
    ),
    "empagliflozin": DrugInfo(
        "sodium-glucose co-transporter 2 (SGLT2) inhibitor",
        ("genital fungal infection", "urinary tract infection", "volume depletion"),
        "It is paused during acute illness because of the rare risk of ketoacidosis.",
    ),
    "ferrous sulfate": DrugInfo(
        "oral iron preparation", ("constipation", "dark stools", "nausea"),
        "Tea and antacids reduce absorption; alternate-day dosing may improve tolerance.",
    ),
    "flucloxacillin": DrugInfo(
        "penicillinase-resistant penicillin",
        ("diarrhoea", "nausea", "rarely cholestatic jaundice"),
        "It is best absorbed on an empty stomach.",
    ),
    "furosemide": DrugInfo(
        "loop diuretic", ("hypokalaemia", "dehydration", "gout"),
        "Renal function and electrolytes are monitored during treatment.",
    ),
    "glyceryl trinitrate": DrugInfo(
        "nitrate vasodilator", ("headache", "flushing", "postural hypotension"),
        "It must not be combined with phosphodiesterase-5 inhibitors.",
    ),
    "hydrocortisone": DrugInfo(
        "mild-potency topical corticosteroid", ("skin thinning", "local irritation", "stinging"),
        "It is applied thinly and for the shortest time needed.",
    ),
    "hydroxocobalamin": DrugInfo(
        "vitamin B12 replacement", ("injection-site pain", "nausea", "transient hypokalaemia"),
        "Injections continue for life when the cause is pernicious anaemia.",
    ),
    "ibuprofen": DrugInfo(
        "non-steroidal anti-inflammatory drug", ("dyspepsia", "gastrointestinal bleeding",
                                                 "fluid retention"),
        "It is avoided in severe heart failure and used cautiously in kidney disease.",
    ),
    "lactulose": DrugInfo(
        "osmotic laxative", ("flatulence", "abdominal cramps", "diarrhoea"),
        "It may take up to 48 hours to act.",
    ),
    "lamotrigine": DrugInfo(
        "sodium-channel blocking antiseizure medication", ("rash", "dizziness", "diplopia"),
        "Slow dose titration reduces the risk of serious skin reactions.",
    ),
    "lansoprazole": DrugInfo(
        "proton pump inhibitor", ("headache", "diarrhoea", "hypomagnesaemia with long-term use"),
        "The lowest effective dose is used for long-term maintenance.",
    ),
    "levetiracetam": DrugInfo(
        "antiseizure medication", ("drowsiness", "irritability", "low mood"),
        "Mood changes should be reported, and it is withdrawn gradually.",
    ),
    "levothyroxine": DrugInfo(
        "synthetic thyroxine (T4)", ("palpitations if over-replaced", "tremor", "weight loss"),
        "It is taken on an empty stomach, and TSH is rechecked 6 to 8 weeks after a dose change.",
    ),
    "lisinopril": DrugInfo(
        "angiotensin-converting enzyme (ACE) inhibitor", ("dry cough", "hyperkalaemia",
                                                          "dizziness"),
        "Potassium and renal function are checked before and 1 to 2 weeks after starting.",
    ),
    "macrogol": DrugInfo(
        "osmotic laxative", ("bloating", "abdominal pain", "nausea"),
        "Each sachet is dissolved in water, and a good fluid intake is advised.",
    ),
    "metformin": DrugInfo(
        "biguanide oral antidiabetic", ("diarrhoea", "nausea", "vitamin B12 deficiency"),
        "It is stopped when eGFR falls below 30 mL/min/1.73m2 because of lactic acidosis risk.",
    ),
    "methotrexate": DrugInfo(
        "disease-modifying antirheumatic drug", ("nausea", "mouth ulcers",
                                                 "bone marrow suppression"),
        "It is taken once weekly with folic acid, with regular blood count and liver monitoring.",
    ),
    "mometasone": DrugInfo(
        "intranasal corticosteroid", ("nasal irritation", "epistaxis", "headache"),
        "Full benefit may take several days of regular use.",
    ),
    "naproxen": DrugInfo(
        "non-steroidal anti-inflammatory drug", ("dyspepsia", "gastrointestinal bleeding",
                                                 "renal impairment"),
        "Gastroprotection with a proton pump inhibitor is considered for older people.",
    ),
    "nitrofurantoin": DrugInfo(
        "urinary antibacterial", ("nausea", "brown urine", "pulmonary reactions with long use"),
        "It is avoided when eGFR is below 45 mL/min/1.73m2.",
    ),
    "omeprazole": DrugInfo(
        "proton pump inhibitor", ("headache", "diarrhoea", "hypomagnesaemia with long-term use"),
        "Long-term use is linked to enteric infections and fractures.",
    ),
    "paracetamol": DrugInfo(
        "simple analgesic and antipyretic", ("rare at therapeutic doses", "rash",
                                              "hepatotoxicity in overdose"),
        "The maximum adult dose is 4 g in 24 hours.",
    ),
    "phenoxymethylpenicillin": DrugInfo(
        "oral penicillin (penicillin V)", ("diarrhoea", "nausea", "hypersensitivity reactions"),
        "It is taken on an empty stomach for a full 10-day course.",
    ),
    "prednisolone": DrugInfo(
        "oral glucocorticoid", ("hyperglycaemia", "mood change", "insomnia"),
        "Courses of up to three weeks can usually be stopped without tapering.",
    ),
    "propranolol": DrugInfo(
        "non-selective beta-blocker", ("fatigue", "cold hands", "bronchospasm"),
        "It is contraindicated in asthma.",
    ),
    "ramipril": DrugInfo(
        "angiotensin-converting enzyme (ACE) inhibitor", ("dry cough", "hyperkalaemia",
                                                          "angioedema"),
        "It is contraindicated in pregnancy.",
    ),
    "rivaroxaban": DrugInfo(
        "direct oral anticoagulant (factor Xa inhibitor)", ("bleeding", "anaemia", "dizziness"),
        "The 15 mg and 20 mg tablets are taken with food.",
    ),
    "salbutamol": DrugInfo(
        "short-acting beta-2 agonist bronchodilator", ("tremor", "palpitations", "headache"),
        "Needing it more than three times a week suggests poor asthma control.",
    ),
    "sertraline": DrugInfo(
        "selective serotonin reuptake inhibitor", ("nausea", "insomnia", "sexual dysfunction"),
        "Anxiety may increase during the first weeks of treatment.",
    ),
    "simvastatin": DrugInfo(
        "HMG-CoA reductase inhibitor (statin)", ("myalgia", "raised transaminases", "headache"),
        "It interacts with strong CYP3A4 inhibitors such as some macrolides.",
    ),
    "sumatriptan": DrugInfo(
        "5-HT1B/1D receptor agonist (triptan)", ("tingling", "chest tightness", "flushing"),
        "It is contraindicated in ischaemic heart disease.",
    ),
    "tamsulosin": DrugInfo(
        "alpha-1 adrenoceptor blocker", ("dizziness", "postural hypotension",
                                         "ejaculatory disorder"),
        "The first dose may cause light-headedness on standing.",
    ),
    "trimethoprim": DrugInfo(
        "folate antagonist antibacterial", ("hyperkalaemia", "rash", "nausea"),
        "It is avoided in the first trimester of pregnancy.",
    ),
}  # fmt: skip


CONDITIONS: tuple[Condition, ...] = (
    Condition(
        icd10="E11.9",
        name="type 2 diabetes mellitus without complications",
        medications=("metformin", "empagliflozin"),
        specialty="Diabetes and Endocrinology",
        complaints=("increased thirst and passing urine often", "tiredness and thirst"),
        symptoms=("polyuria", "polydipsia", "fatigue", "blurred vision", "recurrent thrush"),
        duration_days=(30, 180),
        definition="a chronic metabolic disorder of insulin resistance and relative insulin "
        "deficiency causing hyperglycaemia",
        diagnosis_basis="Diagnosis requires an HbA1c of 6.5% (48 mmol/mol) or more, or a "
        "fasting plasma glucose of 7.0 mmol/L or more.",
        labs=(("hba1c", 8.6, 1.0), ("glucose", 10.5, 2.0)),
        background=("BMI 33", "family history of diabetes", "BMI 31, sedentary job"),
        plan=(
            "Referred for structured diabetes education.",
            "Retinal screening requested.",
            "Dietary advice given.",
        ),
        follow_up=("repeat HbA1c in 3 months", "diabetes clinic review in 3 months"),
        age_range=(35, 85),
    ),
    Condition(
        icd10="I10",
        name="essential hypertension",
        medications=("amlodipine", "lisinopril"),
        specialty="General Medicine",
        complaints=("raised blood pressure on home readings", "occasional headaches"),
        symptoms=(
            "occasional morning headaches",
            "raised home blood pressure readings",
            "no chest pain",
        ),
        duration_days=(30, 365),
        definition="persistently raised arterial blood pressure without an identifiable "
        "secondary cause",
        diagnosis_basis="Diagnosis is confirmed by ambulatory or home blood pressure "
        "monitoring averaging 135/85 mmHg or higher.",
        labs=(("creatinine", 86.0, 14.0), ("potassium", 4.3, 0.3), ("hba1c", 5.5, 0.3)),
        vitals=(("sbp", 162.0, 10.0), ("dbp", 98.0, 7.0)),
        findings=("heart sounds normal", "no peripheral oedema", "fundi normal"),
        background=("ex-smoker", "family history of stroke", "high salt intake"),
        plan=(
            "ECG and urine albumin:creatinine ratio requested.",
            "Lifestyle advice on salt and alcohol given.",
        ),
        follow_up=("blood pressure check in 4 weeks", "review with home readings in 4 weeks"),
        age_range=(40, 85),
    ),
    Condition(
        icd10="J18.9",
        name="community-acquired pneumonia",
        medications=("amoxicillin", "doxycycline"),
        specialty="Respiratory Medicine",
        complaints=("productive cough and fever", "shortness of breath and fever"),
        symptoms=("productive cough", "fever", "pleuritic chest pain", "breathlessness", "rigors"),
        duration_days=(2, 7),
        definition="an acute infection of the lung parenchyma acquired outside hospital",
        diagnosis_basis="Diagnosis rests on new consolidation on chest X-ray with compatible "
        "symptoms; the CURB-65 score guides severity.",
        labs=(("wbc", 15.5, 3.0), ("crp", 140.0, 55.0)),
        vitals=(("temp", 38.4, 0.4), ("hr", 104.0, 9.0), ("rr", 23.0, 2.5), ("spo2", 92.5, 2.0)),
        findings=(
            "crackles at the right base",
            "bronchial breathing at the left base",
            "dull to percussion at the right base",
        ),
        background=("smoker", "lives alone", "recent viral illness"),
        plan=(
            "Chest X-ray showed lobar consolidation.",
            "Sputum culture sent.",
            "CURB-65 score 1.",
        ),
        follow_up=("repeat chest X-ray in 6 weeks", "GP review in 1 week"),
        inpatient=True,
        age_range=(20, 90),
    ),
    Condition(
        icd10="N39.0",
        name="urinary tract infection",
        medications=("nitrofurantoin", "trimethoprim"),
        specialty="General Practice",
        complaints=("burning when passing urine", "urinary frequency and dysuria"),
        symptoms=("dysuria", "urinary frequency", "suprapubic pain", "cloudy urine"),
        duration_days=(1, 5),
        definition="a bacterial infection of the urinary tract, most often of the bladder",
        diagnosis_basis="Diagnosis is clinical, supported by nitrites and leukocytes on urine "
        "dipstick and confirmed by urine culture.",
        labs=(("wbc", 11.8, 2.2), ("crp", 42.0, 20.0)),
        vitals=(("temp", 37.6, 0.4), ("hr", 88.0, 8.0)),
        findings=("suprapubic tenderness", "urine dipstick positive for nitrites and leukocytes"),
        background=("similar episode last year", "no catheter"),
        female_background=("postmenopausal", "sexually active"),
        plan=("Urine sent for culture.", "Advised to maintain fluid intake."),
        follow_up=("return if no better in 48 hours", "review culture result in 3 days"),
        inpatient=True,
        age_range=(18, 90),
    ),
    Condition(
        icd10="J44.1",
        name="chronic obstructive pulmonary disease with acute exacerbation",
        medications=("prednisolone", "doxycycline"),
        specialty="Respiratory Medicine",
        complaints=("worsening breathlessness", "increased sputum and wheeze"),
        symptoms=("increased breathlessness", "purulent sputum", "wheeze", "chest tightness"),
        duration_days=(2, 10),
        definition="an acute worsening of chronic airflow limitation, usually triggered by "
        "infection",
        diagnosis_basis="Diagnosis is clinical in a person with spirometry-confirmed COPD; "
        "blood gases and a chest X-ray exclude other causes.",
        labs=(("wbc", 11.6, 2.2), ("crp", 34.0, 12.0), ("eos", 0.25, 0.1)),
        vitals=(("spo2", 89.0, 2.0), ("rr", 24.0, 2.5), ("hr", 98.0, 8.0)),
        findings=(
            "widespread expiratory wheeze",
            "reduced air entry bilaterally",
            "prolonged expiratory phase",
        ),
        background=(
            "40 pack-year smoking history",
            "home oxygen not required",
            "two exacerbations last year",
        ),
        plan=(
            "Target saturations 88-92%.",
            "Inhaler technique reviewed.",
            "Referred for pulmonary rehabilitation.",
        ),
        follow_up=("respiratory nurse review in 2 weeks", "GP review in 2 weeks"),
        inpatient=True,
        age_range=(50, 90),
    ),
    Condition(
        icd10="J45.9",
        name="asthma",
        medications=("salbutamol", "beclometasone"),
        specialty="Respiratory Medicine",
        complaints=("wheeze and night-time cough", "chest tightness on exercise"),
        symptoms=("wheeze", "night-time cough", "chest tightness", "breathlessness on exertion"),
        duration_days=(7, 120),
        definition="a chronic inflammatory airway disease with variable, reversible airflow "
        "obstruction",
        diagnosis_basis="Diagnosis is supported by variable peak flow, bronchodilator "
        "reversibility on spirometry and a raised FeNO.",
        labs=(("eos", 0.55, 0.15), ("pef", 63.0, 9.0)),
        vitals=(("rr", 21.0, 2.0), ("hr", 98.0, 9.0), ("spo2", 95.0, 1.5)),
        findings=("scattered expiratory wheeze", "no use of accessory muscles"),
        background=("childhood eczema", "cat at home", "hay fever"),
        plan=("Personalised asthma action plan given.", "Inhaler technique checked."),
        follow_up=("asthma review in 4 weeks", "review with peak flow diary in 4 weeks"),
        inpatient=True,
        age_range=(16, 70),
    ),
    Condition(
        icd10="I50.9",
        name="heart failure",
        medications=("furosemide", "bisoprolol", "ramipril"),
        specialty="Cardiology",
        complaints=("breathlessness and ankle swelling", "orthopnoea"),
        symptoms=("exertional breathlessness", "orthopnoea", "ankle swelling", "fatigue"),
        duration_days=(7, 60),
        definition="a syndrome in which the heart cannot pump enough blood to meet the "
        "body's needs, causing congestion and fatigue",
        diagnosis_basis="Diagnosis combines a raised NT-proBNP with echocardiography showing "
        "structural or functional cardiac abnormality.",
        labs=(("ntprobnp", 2600.0, 1200.0), ("sodium", 134.0, 2.5), ("creatinine", 112.0, 20.0)),
        vitals=(("spo2", 93.0, 2.0), ("rr", 21.0, 2.0), ("hr", 92.0, 9.0)),
        findings=("bibasal crackles", "pitting oedema to the knees", "raised JVP"),
        background=("previous myocardial infarction", "ischaemic heart disease"),
        plan=(
            "Echocardiogram requested.",
            "Daily weights advised.",
            "Fluid restriction 1.5 L/day.",
        ),
        follow_up=("heart failure nurse review in 2 weeks", "cardiology clinic in 6 weeks"),
        inpatient=True,
        age_range=(55, 92),
    ),
    Condition(
        icd10="I48.9",
        name="atrial fibrillation",
        medications=("apixaban", "bisoprolol"),
        specialty="Cardiology",
        complaints=("palpitations", "irregular heartbeat and breathlessness"),
        symptoms=(
            "palpitations",
            "breathlessness",
            "light-headedness",
            "reduced exercise tolerance",
        ),
        duration_days=(1, 30),
        definition="a supraventricular arrhythmia with uncoordinated atrial activation and an "
        "irregularly irregular ventricular rhythm",
        diagnosis_basis="Diagnosis requires an ECG showing an irregularly irregular rhythm "
        "without distinct P waves; CHA2DS2-VASc guides anticoagulation.",
        labs=(("tsh", 1.8, 0.6), ("potassium", 4.2, 0.3)),
        vitals=(("hr", 126.0, 14.0),),
        findings=("irregularly irregular pulse", "ECG confirms atrial fibrillation"),
        background=("hypertension", "CHA2DS2-VASc score 3", "moderate alcohol intake"),
        plan=("Echocardiogram requested.", "CHA2DS2-VASc 3, ORBIT score low."),
        follow_up=("cardiology clinic in 6 weeks", "ECG and review in 2 weeks"),
        inpatient=True,
        age_range=(50, 92),
        dose_overrides=(("apixaban", ("5 mg PO BID", "2.5 mg PO BID")),),
    ),
    Condition(
        icd10="E03.9",
        name="hypothyroidism",
        medications=("levothyroxine",),
        specialty="Diabetes and Endocrinology",
        complaints=("tiredness and weight gain", "feeling cold and sluggish"),
        symptoms=("fatigue", "weight gain", "cold intolerance", "constipation", "dry skin"),
        duration_days=(60, 240),
        definition="underactivity of the thyroid gland with deficient thyroid hormone production",
        diagnosis_basis="Diagnosis is made by a raised TSH with a low free T4.",
        labs=(("tsh", 11.5, 3.5), ("ft4", 8.3, 1.2)),
        vitals=(("hr", 61.0, 6.0),),
        findings=("dry skin", "slow-relaxing reflexes", "no goitre"),
        background=("family history of thyroid disease", "type 1 diabetes in sibling"),
        plan=("Thyroid peroxidase antibodies requested.",),
        follow_up=("repeat TSH in 6-8 weeks", "review with thyroid function in 8 weeks"),
        age_range=(25, 85),
    ),
    Condition(
        icd10="F32.9",
        name="depressive episode",
        medications=("sertraline", "citalopram"),
        specialty="Psychiatry",
        complaints=("low mood", "low mood and poor sleep"),
        symptoms=(
            "low mood",
            "anhedonia",
            "early morning waking",
            "poor concentration",
            "reduced appetite",
        ),
        duration_days=(21, 180),
        definition="a period of persistent low mood or loss of interest lasting at least two "
        "weeks, with biological and cognitive symptoms",
        diagnosis_basis="Diagnosis is clinical, using ICD-10 criteria, with the PHQ-9 to grade "
        "severity.",
        labs=(("phq9", 17.0, 3.0), ("tsh", 2.0, 0.6)),
        findings=("flat affect", "no psychotic features", "no active suicidal intent"),
        background=("recent bereavement", "work stress", "previous episode 5 years ago"),
        plan=("Referred for talking therapy.", "Safety plan discussed and crisis numbers given."),
        follow_up=("review in 2 weeks", "review in 2 weeks, sooner if worse"),
        age_range=(18, 80),
    ),
    Condition(
        icd10="K21.9",
        name="gastro-oesophageal reflux disease",
        medications=("omeprazole", "lansoprazole"),
        specialty="Gastroenterology",
        complaints=("heartburn", "acid reflux after meals"),
        symptoms=("heartburn", "acid regurgitation", "epigastric discomfort", "worse lying flat"),
        duration_days=(21, 180),
        definition="reflux of gastric contents into the oesophagus causing troublesome symptoms",
        diagnosis_basis="Diagnosis is usually clinical; endoscopy is reserved for alarm "
        "features such as dysphagia or weight loss.",
        labs=(("hb", 139.0, 9.0),),
        findings=("mild epigastric tenderness", "no weight loss", "no dysphagia"),
        background=("BMI 30", "drinks coffee daily", "smoker"),
        plan=("Lifestyle advice: smaller meals, raise head of bed.",),
        follow_up=("review in 4 weeks", "review in 8 weeks"),
        age_range=(20, 80),
    ),
    Condition(
        icd10="G43.9",
        name="migraine",
        medications=("sumatriptan", "propranolol"),
        specialty="Neurology",
        complaints=("recurrent headaches", "throbbing headaches with nausea"),
        symptoms=("unilateral throbbing headache", "photophobia", "nausea", "visual aura"),
        duration_days=(30, 365),
        definition="a primary headache disorder of recurrent attacks of moderate to severe "
        "throbbing headache with nausea or light sensitivity",
        diagnosis_basis="Diagnosis is clinical; neuroimaging is only needed for red flag features.",
        findings=("neurological examination normal", "fundi normal"),
        background=("mother has migraine", "triggered by poor sleep"),
        female_background=("attacks around menstruation",),
        plan=("Headache diary advised.", "Red flag symptoms explained."),
        follow_up=("review with headache diary in 8 weeks", "review in 3 months"),
        age_range=(16, 65),
    ),
    Condition(
        icd10="M10.9",
        name="gout",
        medications=("colchicine", "naproxen"),
        specialty="Rheumatology",
        complaints=("painful swollen big toe", "acute joint pain"),
        symptoms=(
            "severe pain in the first MTP joint",
            "joint swelling",
            "redness",
            "pain at night",
        ),
        duration_days=(1, 4),
        definition="an inflammatory arthritis caused by deposition of monosodium urate crystals",
        diagnosis_basis="Diagnosis is clinical and confirmed by urate crystals in joint "
        "fluid; serum urate is best measured after the flare.",
        labs=(("urate", 520.0, 60.0), ("crp", 30.0, 15.0), ("creatinine", 95.0, 15.0)),
        vitals=(("temp", 37.2, 0.3),),
        findings=("hot swollen first MTP joint", "exquisitely tender joint"),
        background=("high alcohol intake", "previous attack 2 years ago"),
        plan=("Rest, ice and elevation advised.", "Urate-lowering therapy to be discussed."),
        follow_up=("repeat urate in 4 weeks", "review in 4 weeks"),
        age_range=(35, 85),
    ),
    Condition(
        icd10="I80.2",
        name="deep vein thrombosis of the lower limb",
        medications=("apixaban", "rivaroxaban"),
        specialty="Acute Medicine",
        complaints=("painful swollen calf", "leg swelling"),
        symptoms=("unilateral calf swelling", "calf pain", "warmth of the leg"),
        duration_days=(1, 7),
        definition="thrombus formation in a deep vein of the leg",
        diagnosis_basis="Diagnosis uses the Wells score, D-dimer and compression "
        "ultrasound of the leg veins.",
        labs=(("ddimer", 2400.0, 900.0), ("platelets", 265.0, 45.0)),
        vitals=(("hr", 86.0, 8.0), ("temp", 37.1, 0.3)),
        findings=(
            "calf circumference 3 cm greater",
            "pitting oedema of the leg",
            "ultrasound confirms popliteal DVT",
        ),
        background=("recent long-haul flight", "recent knee surgery"),
        female_background=("combined oral contraceptive pill",),
        plan=("Compression ultrasound confirmed thrombus.", "Wells score 2."),
        follow_up=("anticoagulation clinic in 3 months", "review at 3 months"),
        inpatient=True,
        age_range=(20, 85),
        dose_overrides=(("apixaban", ("10 mg PO BID for 7 days then 5 mg PO BID",)),),
    ),
    Condition(
        icd10="L03.1",
        name="cellulitis of the lower limb",
        medications=("flucloxacillin",),
        specialty="Acute Medicine",
        complaints=("red hot swollen leg", "spreading redness of the shin"),
        symptoms=("spreading redness", "warmth", "swelling", "pain", "feeling feverish"),
        duration_days=(1, 5),
        definition="an acute bacterial infection of the dermis and subcutaneous tissue, "
        "usually streptococcal or staphylococcal",
        diagnosis_basis="Diagnosis is clinical; the edge of erythema is marked to track "
        "response to treatment.",
        labs=(("wbc", 13.5, 2.5), ("crp", 95.0, 40.0)),
        vitals=(("temp", 37.9, 0.4), ("hr", 94.0, 8.0)),
        findings=("erythema with a marked edge", "tender warm shin", "no fluctuance"),
        background=("tinea pedis", "leg oedema", "recent insect bite"),
        plan=("Margin of erythema marked.", "Leg elevation advised."),
        follow_up=("review in 48 hours", "GP review in 5 days"),
        inpatient=True,
        age_range=(20, 90),
    ),
    Condition(
        icd10="M17.9",
        name="osteoarthritis of the knee",
        medications=("paracetamol", "ibuprofen"),
        specialty="Orthopaedics",
        complaints=("knee pain", "painful stiff knee"),
        symptoms=(
            "knee pain on walking",
            "morning stiffness under 30 minutes",
            "crepitus",
            "reduced walking distance",
        ),
        duration_days=(90, 720),
        definition="a degenerative joint disease with loss of cartilage and bony remodelling",
        diagnosis_basis="Diagnosis is clinical in people over 45 with activity-related pain "
        "and short morning stiffness; X-rays are optional.",
        labs=(("crp", 3.0, 1.5), ("esr", 12.0, 4.0)),
        findings=("crepitus on flexion", "small effusion", "bony swelling of the joint line"),
        background=("BMI 32", "previous meniscal tear"),
        plan=("Referred to physiotherapy for strengthening exercises.", "Weight loss advised."),
        follow_up=("review in 6 weeks", "physiotherapy review in 6 weeks"),
        age_range=(45, 90),
    ),
    Condition(
        icd10="E78.5",
        name="hyperlipidaemia",
        medications=("atorvastatin", "simvastatin"),
        specialty="General Practice",
        complaints=("raised cholesterol on screening", "cardiovascular risk review"),
        symptoms=("no symptoms", "raised cholesterol found at a health check"),
        duration_days=(7, 60),
        definition="raised blood concentrations of cholesterol or triglycerides",
        diagnosis_basis="Diagnosis uses a lipid profile; the QRISK3 score estimates 10-year "
        "cardiovascular risk.",
        labs=(("ldl", 4.6, 0.6), ("chol", 7.0, 0.7), ("hba1c", 5.6, 0.3)),
        findings=("no xanthelasma", "BMI 29"),
        background=("QRISK3 14%", "father had a myocardial infarction at 60", "ex-smoker"),
        plan=("Diet and exercise advice given.", "QRISK3 discussed."),
        follow_up=("repeat lipids in 3 months", "lipids and ALT in 3 months"),
        age_range=(40, 84),
    ),
    Condition(
        icd10="N18.3",
        name="chronic kidney disease, stage 3",
        medications=("ramipril", "dapagliflozin"),
        specialty="Nephrology",
        complaints=("abnormal kidney function on blood tests", "routine kidney review"),
        symptoms=("tiredness", "nocturia", "no urinary symptoms"),
        duration_days=(90, 365),
        definition="a sustained reduction in kidney function with an eGFR of 30 to 59 "
        "mL/min/1.73m2 for more than three months",
        diagnosis_basis="Diagnosis needs two eGFR results at least 90 days apart, plus the "
        "urine albumin:creatinine ratio to stage albuminuria.",
        labs=(("egfr", 44.0, 7.0), ("creatinine", 142.0, 22.0), ("potassium", 4.8, 0.35)),
        vitals=(("sbp", 142.0, 10.0),),
        findings=("mild ankle oedema", "no bladder enlargement"),
        background=("type 2 diabetes", "hypertension", "urine ACR 40 mg/mmol"),
        plan=("Renal ultrasound requested.", "Avoid NSAIDs."),
        follow_up=("repeat U&E in 2 weeks", "renal function in 3 months"),
        age_range=(50, 90),
    ),
    Condition(
        icd10="D50.9",
        name="iron deficiency anaemia",
        medications=("ferrous sulfate",),
        specialty="Haematology",
        complaints=("tiredness", "tiredness and breathlessness on exertion"),
        symptoms=("fatigue", "breathlessness on exertion", "pallor", "hair thinning"),
        duration_days=(30, 180),
        definition="anaemia caused by insufficient iron for haemoglobin synthesis",
        diagnosis_basis="Diagnosis is a low haemoglobin with low ferritin and microcytosis; "
        "the cause, such as blood loss, must be sought.",
        labs=(("hb", 97.0, 9.0), ("mcv", 72.0, 4.0), ("ferritin", 8.0, 3.0)),
        vitals=(("hr", 88.0, 8.0),),
        findings=("conjunctival pallor", "angular cheilitis"),
        background=("vegetarian diet", "coeliac screen negative"),
        female_background=("heavy menstrual periods",),
        plan=("Coeliac serology sent.", "Dietary iron advice given."),
        follow_up=("repeat full blood count in 4 weeks", "review with FBC in 4 weeks"),
        age_range=(18, 85),
    ),
    Condition(
        icd10="G40.9",
        name="epilepsy",
        medications=("levetiracetam", "lamotrigine"),
        specialty="Neurology",
        complaints=("a seizure", "two generalised seizures"),
        symptoms=("witnessed tonic-clonic seizure", "tongue biting", "post-ictal confusion"),
        duration_days=(1, 60),
        definition="a neurological disorder with an enduring predisposition to unprovoked seizures",
        diagnosis_basis="Diagnosis is clinical, based on a witness account, with EEG and MRI "
        "to classify the epilepsy.",
        labs=(("sodium", 139.0, 2.0), ("glucose", 5.2, 0.4)),
        findings=("neurological examination normal", "lateral tongue bite"),
        background=("previous unexplained seizure", "sleep deprivation"),
        plan=("EEG and MRI brain requested.", "Advised not to drive and to inform the DVLA."),
        follow_up=("first seizure clinic in 4 weeks", "neurology review in 3 months"),
        inpatient=True,
        age_range=(18, 70),
    ),
    Condition(
        icd10="J03.0",
        name="streptococcal tonsillitis",
        medications=("phenoxymethylpenicillin",),
        specialty="General Practice",
        complaints=("sore throat and fever", "painful swallowing"),
        symptoms=("sore throat", "fever", "painful swallowing", "no cough"),
        duration_days=(1, 5),
        definition="acute inflammation of the palatine tonsils caused by group A streptococcus",
        diagnosis_basis="The FeverPAIN or Centor score estimates the likelihood of "
        "streptococcal infection.",
        labs=(("wbc", 13.0, 2.5), ("crp", 60.0, 25.0)),
        vitals=(("temp", 38.3, 0.4), ("hr", 96.0, 8.0)),
        findings=("exudative tonsils", "tender anterior cervical nodes"),
        background=("no previous quinsy",),
        plan=("FeverPAIN score 4.", "Advised fluids and rest."),
        follow_up=("return if not improving in 3 days", "review if symptoms persist"),
        age_range=(16, 50),
    ),
    Condition(
        icd10="E05.9",
        name="thyrotoxicosis",
        medications=("carbimazole",),
        specialty="Diabetes and Endocrinology",
        complaints=("palpitations and weight loss", "heat intolerance and tremor"),
        symptoms=("weight loss", "palpitations", "heat intolerance", "tremor", "anxiety"),
        duration_days=(30, 120),
        definition="excess circulating thyroid hormone, most often due to Graves disease",
        diagnosis_basis="Diagnosis is a suppressed TSH with raised free T4; TSH receptor "
        "antibodies identify Graves disease.",
        labs=(("tsh", 0.04, 0.02), ("ft4", 34.0, 7.0)),
        vitals=(("hr", 106.0, 9.0), ("temp", 37.1, 0.3)),
        findings=("fine tremor", "diffuse goitre", "lid lag"),
        background=("family history of thyroid disease", "smoker"),
        plan=("TSH receptor antibodies requested.",),
        follow_up=("thyroid function in 4-6 weeks", "endocrine review in 6 weeks"),
        age_range=(20, 70),
    ),
    Condition(
        icd10="F41.1",
        name="generalised anxiety disorder",
        medications=("sertraline",),
        specialty="Psychiatry",
        complaints=("constant worry", "anxiety and poor sleep"),
        symptoms=("excessive worry", "restlessness", "poor sleep", "muscle tension"),
        duration_days=(180, 720),
        definition="persistent, excessive and difficult-to-control worry about many areas of "
        "life for at least six months",
        diagnosis_basis="Diagnosis is clinical; the GAD-7 questionnaire grades severity.",
        labs=(("gad7", 15.0, 3.0), ("tsh", 1.9, 0.6)),
        vitals=(("hr", 86.0, 8.0),),
        findings=("anxious but appropriate", "no suicidal ideation"),
        background=("caring for a parent", "work stress"),
        plan=("Referred for cognitive behavioural therapy.",),
        follow_up=("review in 2 weeks", "review in 4 weeks"),
        age_range=(18, 75),
    ),
    Condition(
        icd10="I20.9",
        name="angina pectoris",
        medications=("glyceryl trinitrate", "aspirin"),
        specialty="Cardiology",
        complaints=("chest tightness on exertion", "exertional chest pain"),
        symptoms=(
            "central chest tightness on exertion",
            "relief with rest",
            "breathlessness on hills",
        ),
        duration_days=(14, 120),
        definition="chest discomfort caused by myocardial ischaemia, typically provoked by "
        "exertion and relieved by rest",
        diagnosis_basis="Diagnosis is clinical and confirmed by CT coronary angiography or "
        "functional imaging; troponin is normal in stable angina.",
        labs=(("troponin", 6.0, 3.0), ("ldl", 3.4, 0.6), ("chol", 5.6, 0.6)),
        vitals=(("sbp", 142.0, 11.0),),
        findings=("ECG normal at rest", "heart sounds normal"),
        background=("smoker", "type 2 diabetes", "family history of ischaemic heart disease"),
        plan=("CT coronary angiogram requested.", "Smoking cessation advice given."),
        follow_up=("rapid access chest pain clinic", "cardiology review in 6 weeks"),
        inpatient=True,
        age_range=(45, 88),
    ),
    Condition(
        icd10="K59.0",
        name="constipation",
        medications=("macrogol", "lactulose"),
        specialty="General Practice",
        complaints=("infrequent hard stools", "constipation"),
        symptoms=("infrequent stools", "straining", "bloating", "hard stools"),
        duration_days=(14, 120),
        definition="infrequent or difficult passage of hard stools",
        diagnosis_basis="Diagnosis is clinical; red flags such as rectal bleeding or weight "
        "loss prompt investigation.",
        labs=(("calcium", 2.38, 0.07), ("tsh", 2.0, 0.6)),
        findings=("abdomen soft, non-tender", "no masses palpable"),
        background=("low fibre diet", "reduced mobility"),
        plan=("Fibre and fluid advice given.",),
        follow_up=("review in 4 weeks", "review in 6 weeks"),
        age_range=(20, 90),
    ),
    Condition(
        icd10="L20.9",
        name="atopic dermatitis",
        medications=("hydrocortisone",),
        specialty="Dermatology",
        complaints=("itchy rash", "dry itchy skin"),
        symptoms=("itchy dry skin", "flexural rash", "sleep disturbed by itch"),
        duration_days=(14, 365),
        definition="a chronic relapsing inflammatory skin condition with itch and dry skin",
        diagnosis_basis="Diagnosis is clinical, based on itch, typical distribution and a "
        "personal or family history of atopy.",
        labs=(("eos", 0.45, 0.12),),
        findings=("erythematous patches in the flexures", "excoriations", "dry skin"),
        background=("hay fever", "asthma in childhood"),
        plan=("Regular emollients advised.", "Avoid soap substitutes with fragrance."),
        follow_up=("review in 2 weeks", "review in 4 weeks"),
        age_range=(16, 70),
    ),
    Condition(
        icd10="M81.0",
        name="postmenopausal osteoporosis",
        medications=("alendronic acid",),
        specialty="Rheumatology",
        complaints=("fragility fracture", "back pain after a fall"),
        symptoms=("wrist fracture after a fall from standing", "height loss", "back pain"),
        duration_days=(14, 180),
        definition="reduced bone mass and microarchitectural deterioration after the "
        "menopause, increasing fracture risk",
        diagnosis_basis="Diagnosis uses DXA scanning, with a T-score of -2.5 or lower; FRAX "
        "estimates fracture risk.",
        labs=(("calcium", 2.36, 0.07), ("vitd", 58.0, 12.0)),
        findings=("thoracic kyphosis", "DXA T-score -2.8 at the hip"),
        background=("early menopause", "previous wrist fracture", "mother had hip fracture"),
        plan=("Falls assessment arranged.", "Calcium and vitamin D intake reviewed."),
        follow_up=("review in 3 months", "repeat DXA in 5 years"),
        sex="F",
        age_range=(55, 90),
    ),
    Condition(
        icd10="N40",
        name="benign prostatic hyperplasia",
        medications=("tamsulosin",),
        specialty="Urology",
        complaints=("poor urinary stream", "getting up at night to pass urine"),
        symptoms=("poor stream", "nocturia", "hesitancy", "terminal dribbling"),
        duration_days=(60, 365),
        definition="non-malignant enlargement of the prostate causing lower urinary tract symptoms",
        diagnosis_basis="Diagnosis uses symptom scores, digital rectal examination and PSA to "
        "exclude cancer.",
        labs=(("psa", 2.9, 0.9), ("creatinine", 90.0, 13.0)),
        findings=("smooth enlarged prostate", "bladder not palpable"),
        background=("IPSS 16", "no haematuria"),
        plan=("Frequency-volume chart given.", "Advised to reduce evening fluids."),
        follow_up=("review in 6 weeks", "urology review in 3 months"),
        sex="M",
        age_range=(50, 90),
    ),
    Condition(
        icd10="J30.1",
        name="allergic rhinitis due to pollen",
        medications=("cetirizine", "mometasone"),
        specialty="General Practice",
        complaints=("sneezing and runny nose", "itchy eyes and blocked nose"),
        symptoms=("sneezing", "rhinorrhoea", "nasal blockage", "itchy eyes"),
        duration_days=(7, 60),
        definition="IgE-mediated inflammation of the nasal mucosa triggered by seasonal pollens",
        diagnosis_basis="Diagnosis is clinical; skin-prick or specific IgE testing can "
        "identify the allergen.",
        labs=(("eos", 0.42, 0.12),),
        findings=("pale swollen nasal turbinates", "clear rhinorrhoea"),
        background=("symptoms every summer", "childhood asthma"),
        plan=("Allergen avoidance advice given.",),
        follow_up=("review in 4 weeks", "review if no better"),
        age_range=(16, 65),
    ),
    Condition(
        icd10="E55.9",
        name="vitamin D deficiency",
        medications=("colecalciferol",),
        specialty="General Practice",
        complaints=("aches and tiredness", "generalised muscle aches"),
        symptoms=("bone pain", "muscle aches", "fatigue"),
        duration_days=(30, 240),
        definition="a low vitamin D status that impairs calcium absorption and bone mineralisation",
        diagnosis_basis="Diagnosis is a serum 25-hydroxyvitamin D below 25 nmol/L.",
        labs=(("vitd", 18.0, 5.0), ("calcium", 2.27, 0.06)),
        findings=("proximal muscle tenderness", "no bony deformity"),
        background=("limited sun exposure", "covers skin outdoors"),
        plan=("Dietary and sunlight advice given.",),
        follow_up=("calcium check in 1 month", "review in 3 months"),
        age_range=(18, 90),
    ),
    Condition(
        icd10="D51.9",
        name="vitamin B12 deficiency anaemia",
        medications=("hydroxocobalamin",),
        specialty="Haematology",
        complaints=("tiredness and pins and needles", "fatigue"),
        symptoms=("fatigue", "pins and needles in the feet", "sore tongue", "poor memory"),
        duration_days=(30, 180),
        definition="a macrocytic anaemia due to inadequate vitamin B12, often from pernicious "
        "anaemia",
        diagnosis_basis="Diagnosis is a low serum B12 with macrocytic anaemia; intrinsic "
        "factor antibodies suggest pernicious anaemia.",
        labs=(("hb", 101.0, 9.0), ("mcv", 108.0, 5.0), ("b12", 115.0, 30.0)),
        findings=("glossitis", "reduced vibration sense in the feet"),
        background=("vegan diet", "previous gastric surgery", "autoimmune thyroid disease"),
        plan=("Intrinsic factor antibodies sent.",),
        follow_up=("FBC in 8 weeks", "review after loading doses"),
        age_range=(30, 90),
    ),
    Condition(
        icd10="G20",
        name="Parkinson disease",
        medications=("co-careldopa",),
        specialty="Neurology",
        complaints=("tremor of the hand", "slowness and shuffling walk"),
        symptoms=("resting tremor", "slowness of movement", "small handwriting", "shuffling gait"),
        duration_days=(90, 540),
        definition="a progressive neurodegenerative disorder caused by loss of dopaminergic "
        "neurons in the substantia nigra",
        diagnosis_basis="Diagnosis is clinical: bradykinesia with rest tremor or rigidity, "
        "supported by response to dopaminergic treatment.",
        findings=("cogwheel rigidity", "resting pill-rolling tremor", "reduced arm swing"),
        background=("REM sleep behaviour disorder", "reduced sense of smell"),
        plan=("Referred to Parkinson nurse specialist.", "Physiotherapy referral."),
        follow_up=("movement disorders clinic in 3 months", "review in 3 months"),
        age_range=(55, 90),
    ),
    Condition(
        icd10="M06.9",
        name="rheumatoid arthritis",
        medications=("methotrexate",),
        specialty="Rheumatology",
        complaints=("painful swollen hands", "joint pain and morning stiffness"),
        symptoms=(
            "symmetrical small-joint pain",
            "morning stiffness over an hour",
            "swollen knuckles",
            "fatigue",
        ),
        duration_days=(42, 365),
        definition="a chronic autoimmune inflammatory arthritis of synovial joints",
        diagnosis_basis="Diagnosis uses the ACR/EULAR criteria: joint involvement, serology "
        "(rheumatoid factor, anti-CCP), acute-phase reactants and duration.",
        labs=(("crp", 28.0, 12.0), ("esr", 42.0, 12.0)),
        findings=("synovitis of the MCP joints", "positive squeeze test"),
        background=("anti-CCP positive", "smoker"),
        plan=("Baseline chest X-ray arranged.", "Folic acid once weekly on a different day."),
        follow_up=("bloods every 2 weeks initially", "rheumatology review in 6 weeks"),
        age_range=(25, 80),
    ),
    Condition(
        icd10="B02.9",
        name="herpes zoster",
        medications=("aciclovir",),
        specialty="General Practice",
        complaints=("painful blistering rash", "band-like rash on the chest"),
        symptoms=("burning pain", "vesicular rash in a dermatome", "itch"),
        duration_days=(1, 3),
        definition="reactivation of varicella-zoster virus in a sensory nerve ganglion",
        diagnosis_basis="Diagnosis is clinical from the unilateral dermatomal vesicular "
        "rash; PCR of vesicle fluid confirms atypical cases.",
        findings=("vesicles in the T5 dermatome", "eye not involved"),
        background=("no immunosuppression",),
        plan=("Advised to keep the rash covered.",),
        follow_up=("review in 1 week", "return if eye symptoms develop"),
        age_range=(40, 90),
    ),
)


# ---------------------------------------------------------------------------------------------
# Fake identifiers
# ---------------------------------------------------------------------------------------------


def _words(text: str) -> tuple[str, ...]:
    """Whitespace-separated words: keeps the long name lists compact and easy to edit."""
    return tuple(text.split())


FIRST_NAMES_FEMALE: tuple[str, ...] = _words(
    """Aisha Amara Anjali Beatriz Bronwen Camila Chiara Chloe Chioma Daniela Deepa Eilidh Elena
    Eleni Emily Esra Fatima Fiona Freya Gabriela Hana Hannah Ingrid Isabel Jasmine Jia Kamala
    Katarzyna Keira Lakshmi Leila Lucia Maria Mariam Marta Mei Meera Nadia Naomi Niamh Nkechi
    Noor Olga Olivia Oksana Paloma Priya Rania Rebecca Rosa Ruth Saanvi Sakura Samira Sara
    Shirin Siobhan Sofia Sunita Tamar Thandiwe Valentina Wanjiru Ximena Yasmin Yuki Zainab Zofia
    Adaeze Agnieszka Alejandra Amelia Aoife Ayesha Bianca Carmen Dalia Divya Efua Elif Farah
    Gulnara Hadiza Helga Ifeoma Ilse Irina Janelle Kaveri Kirsten Laila Linnea Lorena Magdalena
    Marisol Nasrin Ngozi Parisa Renata Roya Salma Shreya Tatiana Thuy Ulrike Yara Zara Abena
    Mariana Svetlana Leticia Josephine Margaret Dorothy Eleanor Patricia Catherine Susan Helen
    Alice Lucy Maryam Anneke Signe Ewa Rukhsana Sinead Folake Adwoa Bich Haruka Soo-ah Nomvula
    Ayumi Fernanda Gwen Hedda Inez Jovana Kalinda Lerato Malika Nilufar Oyinda Pooja Rahel"""
)
FIRST_NAMES_MALE: tuple[str, ...] = _words(
    """Abdul Adebayo Ahmed Alejandro Aleksander Ali Amir Andrei Arjun Bilal Bongani Carlos Chidi
    Chinedu Cormac Dariusz David Dmitri Emeka Enrique Erik Farid Felipe Finn Gareth George
    Giovanni Hamza Haruto Hassan Hiroshi Ibrahim Igor Imran Ivan Jamal James Javier Jin Joao
    Jonas Jorge Kenji Kofi Kwame Lars Liam Luca Luis Malik Marco Mateo Matthew Mehmet Michael
    Miguel Mohammed Nikhil Nikolai Olusegun Omar Oscar Pablo Pavel Pedro Rahul Ravi Rashid
    Ricardo Rohan Ruairi Samuel Sanjay Santiago Sergei Sipho Stefan Tariq Thabo Thomas Tomasz
    Tunde Vikram Wei Xavier Yaw Yusuf Zoltan Anders Bartosz Chukwuma Declan Dong-hyun Emre Goran
    Hamid Hyun-woo Joaquin Kemal Kiran Lorenzo Mustafa Nnamdi Obinna Piotr Quang Rafael Reza
    Seamus Tendai Umar Vusi Wojciech Yohannes Arthur Edward Henry Peter Robert Richard William
    Daniel Christopher Anthony Kevin Brian Graham Nigel Aziz Bjorn Cheng Dawit Eamon Florin
    Gustavo Hideo Idris Jakub Kaito Lwazi Mircea Nuno Oluwaseun Paulo Rustam Soren Teodor"""
)
LAST_NAMES: tuple[str, ...] = _words(
    """Abara Acheampong Adeyemi Agarwal Akhtar Al-Farsi Alvarez Andersson Bakshi Banerjee
    Bergstrom Bianchi Bondarenko Castillo Chatterjee Chen Chowdhury Costa Dasgupta Delgado
    Diallo Dimitrov Dubois Eriksen Eze Fernandes Fitzgerald Fischer Gallagher Garcia Ghosh
    Gonzalez Gupta Haddad Hakimi Hansen Hernandez Horvath Hosseini Huang Iyer Jankowski Jensen
    Jimenez Kamau Kang Kapoor Kaur Kelly Khan Kim Kowalski Kozlov Kumar Larsen Lindqvist Liu
    Lopez MacDonald Mahmoud Malhotra Martinez Mehta Mensah Moreno Murphy Mwangi Nakamura Nair
    Ndlovu Nguyen Novak Nowak Nwosu O'Brien O'Connor Obi Okafor Okonkwo Olsen Onyango Ortiz Osei
    Ozturk Pappas Park Patel Pereira Petrov Popescu Quispe Rahman Ramirez Rao Reddy Reyes Rossi
    Sahin Salazar Santos Sato Schmidt Schneider Sharma Silva Singh Sokolov Suzuki Tanaka Tran
    Tshabalala Usman Vargas Vasquez Volkov Wang Watanabe Wojcik Xu Yamamoto Yilmaz Zhang Zhou
    Zielinski Abiodun Achterberg Baptiste Campbell Cohen Davies Evans Farouk Friedman Gallo
    Hughes Jones Kaplan Levy Lindgren Mackenzie Morrison Murray Nielsen Owusu Pham Ricci Robinson
    Russo Sandoval Shapiro Stewart Sullivan Taylor Thompson Torres Varga Walsh Weber Williams
    Zamora Abdi Bello Danjuma Ekwueme Fofana Gueye Juarez Karimi Lungu Moyo Njoroge Okeke
    Petersen Rosen Soto Takahashi Uddin Yeo Zulu Antonelli Brennan Czerwinski Dlamini Esposito
    Forsberg Georgiou Hadjipetrou Ishikawa Jovanovic Kovacs Lemaire Mbatha Nyambura Oyelaran
    Papadopoulos Rasmussen Szabo Teixeira Urquhart Valdez Wisniewski Yadav Zapata"""
)

_ALL_FIRST_NAMES: tuple[str, ...] = FIRST_NAMES_FEMALE + FIRST_NAMES_MALE

_STREETS: tuple[str, ...] = _words(
    """Alder Beacon Birchwood Blackthorn Bramble Cedar Chestnut Clover Elmstead Fernhill
    Foxglove Glenview Hawthorn Heather Juniper Kestrel Larkspur Linden Maple Meadowbank
    Millbrook Oakridge Orchard Primrose Quarry Rowan Saffron Sycamore Thistle Willowbrook
    Windmill Harbour Station Church Victoria Albion Lavender Marigold Sorrel Tansy"""
)
_STREET_KINDS: tuple[str, ...] = (
    "Road", "Street", "Lane", "Avenue", "Close", "Crescent", "Drive", "Way", "Gardens", "Terrace",
)  # fmt: skip
# Fake towns with their invented postcode areas.
_TOWNS: tuple[tuple[str, str], ...] = (
    ("Northbridge", "NB"), ("Eastmoor", "EM"), ("Kingsford", "KF"), ("Ashvale", "AV"),
    ("Brackenford", "BF"), ("Carrow Bay", "CB"), ("Dunmere", "DM"), ("Elmsworth", "EW"),
    ("Glenhaven", "GH"), ("Larchmont Cross", "LX"), ("Millhaven", "MH"), ("Oakhurst", "OH"),
    ("Pennington Vale", "PV"), ("Redcliffe Sands", "RS"), ("Stonebury", "SY"),
    ("Thornwick", "TW"), ("Westmarsh", "WM"), ("Wickham Down", "WD"), ("Ambermouth", "AM"),
    ("Belford Reach", "BR"), ("Drayfield", "DF"), ("Eskerton", "EK"), ("Foxhollow", "FH"),
)  # fmt: skip
_HOSPITALS: tuple[str, ...] = (
    "Northbridge General Hospital", "St Columba's Hospital", "Eastmoor Royal Infirmary",
    "Kingsford University Hospital", "Ashvale District Hospital", "Glenhaven Memorial Hospital",
    "Millhaven Community Hospital", "Stonebury Royal Hospital", "Westmarsh General Hospital",
)  # fmt: skip
_PRACTICES: tuple[str, ...] = (
    "Riverside Medical Practice", "Ashvale Health Centre", "Oakhurst Family Practice",
    "Harbour View Surgery", "Thornwick Group Practice", "Meadowbank Medical Centre",
    "Drayfield Health Centre", "Eskerton Surgery", "Belford Reach Medical Group",
)  # fmt: skip
_ALLERGIES: tuple[str, ...] = (
    "no known drug allergies", "no known drug allergies", "no known drug allergies", "NKDA",
    "penicillin (rash)", "sulfonamides (rash)", "latex", "codeine (vomiting)",
)  # fmt: skip
_PENICILLINS = frozenset({"amoxicillin", "flucloxacillin", "phenoxymethylpenicillin"})
_MONTHS = ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec")
_FIRST_DATE = dt.date(2016, 1, 1)
_DATE_SPAN_DAYS = (dt.date(2024, 12, 31) - _FIRST_DATE).days
_MED = "\x00MED\x00"  # placeholder where the prescribed drug's name goes


# ---------------------------------------------------------------------------------------------
# Sampling helpers
# ---------------------------------------------------------------------------------------------


def age_on(dob: dt.date, day: dt.date) -> int:
    """Completed years of age on ``day`` (the convention a clinician writes in a note)."""
    return day.year - dob.year - ((day.month, day.day) < (dob.month, dob.day))


def _format_date(day: dt.date, style: int) -> str:
    if style == 0:
        return day.isoformat()
    if style == 1:
        return f"{day.day:02d}/{day.month:02d}/{day.year}"
    return f"{day.day} {_MONTHS[day.month - 1]} {day.year}"


def _clipped(rng: random.Random, mean: float, sd: float, floor: float, ceiling: float) -> float:
    return min(ceiling, max(floor, rng.gauss(mean, sd)))


def _join(items: Sequence[str]) -> str:
    """English list: 'a', 'a and b', 'a, b and c'."""
    if len(items) <= 1:
        return "".join(items)
    return ", ".join(items[:-1]) + " and " + items[-1]


def _duration(rng: random.Random, low: int, high: int) -> tuple[int, str]:
    """A symptom duration as (count, unit), in the unit a clinician would use."""
    days = rng.randint(low, high)
    if days < 14:
        return days, "day"
    if days < 90:
        return round(days / 7), "week"
    return round(days / 30), "month"


@dataclass(frozen=True)
class _Patient:
    first: str
    last: str
    sex: str
    dob: str
    age: int
    mrn: str
    address: str

    @property
    def name(self) -> str:
        return f"{self.first} {self.last}"

    @property
    def noun(self) -> str:
        return "woman" if self.sex == "F" else "man"

    @property
    def subject(self) -> str:
        return "she" if self.sex == "F" else "he"

    @property
    def title(self) -> str:
        return "Ms" if self.sex == "F" else "Mr"


def _patient(rng: random.Random, cond: Condition, day: dt.date, style: int) -> _Patient:
    sex = cond.sex or rng.choice("FM")
    first = rng.choice(FIRST_NAMES_FEMALE if sex == "F" else FIRST_NAMES_MALE)
    last = rng.choice(LAST_NAMES)
    target = rng.randint(*cond.age_range)
    dob = day - dt.timedelta(days=int(target * 365.25) + rng.randint(1, 364))
    town, area = rng.choice(_TOWNS)
    letters = "ABDEFGHJLNPQRSTUWXYZ"
    postcode = (
        f"{area}{rng.randint(1, 19)} {rng.randint(1, 9)}{rng.choice(letters)}{rng.choice(letters)}"
    )
    flat = f"Flat {rng.randint(1, 24)}, " if rng.random() < 0.15 else ""
    address = (
        f"{flat}{rng.randint(1, 240)} {rng.choice(_STREETS)} {rng.choice(_STREET_KINDS)}, "
        f"{town} {postcode}"
    )
    mrn = f"MRN {rng.randint(1000, 9999)}-{rng.randint(1000, 9999)}"
    return _Patient(first, last, sex, _format_date(dob, style), age_on(dob, day), mrn, address)


def _doctor(rng: random.Random) -> str:
    first = rng.choice(_ALL_FIRST_NAMES)
    last = rng.choice(LAST_NAMES)
    return f"Dr. {last}" if rng.random() < 0.4 else f"Dr. {first} {last}"


def _vitals(rng: random.Random, cond: Condition) -> dict[str, str]:
    overrides = {key: (mean, sd) for key, mean, sd in cond.vitals}
    values: dict[str, float] = {}
    for key, vital in VITALS.items():
        mean, sd = overrides.get(key, (vital.mean, vital.sd))
        values[key] = _clipped(rng, mean, sd, vital.floor, vital.ceiling)
    values["dbp"] = min(values["dbp"], values["sbp"] - 25)
    return {
        key: f"{value:.{VITALS[key].decimals}f}" if VITALS[key].decimals else str(round(value))
        for key, value in values.items()
    }


def _format_vitals(rng: random.Random, v: dict[str, str]) -> str:
    style = rng.randrange(3)
    if style == 0:
        return (
            f"BP {v['sbp']}/{v['dbp']} mmHg, HR {v['hr']} bpm, T {v['temp']} °C, "
            f"SpO2 {v['spo2']}% on room air, RR {v['rr']}/min"
        )
    if style == 1:
        return (
            f"BP {v['sbp']}/{v['dbp']}, pulse {v['hr']}, temp {v['temp']}C, "
            f"sats {v['spo2']}% RA, RR {v['rr']}"
        )
    return (
        f"blood pressure {v['sbp']}/{v['dbp']} mmHg, heart rate {v['hr']}, "
        f"temperature {v['temp']} C, oxygen saturation {v['spo2']}% on air, "
        f"respiratory rate {v['rr']}"
    )


def _labs(rng: random.Random, cond: Condition) -> list[str]:
    shown = [(key, mean, sd) for key, mean, sd in cond.labs]
    present = {key for key, _, _ in shown}
    extras = [key for key in ROUTINE_LABS if key not in present]
    extra = rng.choice(extras)
    shown.append((extra, LABS[extra].mean, LABS[extra].sd))
    out = []
    for key, mean, sd in shown:
        lab = LABS[key]
        out.append(lab.format(_clipped(rng, mean, sd, lab.floor, lab.ceiling)))
    return out


def _format_labs(rng: random.Random, labs: list[str]) -> str:
    style = rng.randrange(3)
    if style == 0:
        return ", ".join(labs)
    if style == 1:
        return "; ".join(labs)
    return _join(labs)


def _capital(text: str) -> str:
    return text[:1].upper() + text[1:]


# ---------------------------------------------------------------------------------------------
# Note templates
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Encounter:
    """Everything sampled for one note, shared by the three templates."""

    cond: Condition
    patient: _Patient
    date: str
    end_date: str
    doctor: str
    site: str
    practice: str
    complaint: str
    history: str
    background: str  # "" or " Background: ...." (leading space)
    vitals: str
    finding: str
    labs: str
    dose: str
    plan: str
    follow_up: str
    allergy: str


def _history(rng: random.Random, cond: Condition, p: _Patient) -> str:
    symptoms = _join(rng.sample(cond.symptoms, min(len(cond.symptoms), rng.randint(2, 3))))
    count, unit = _duration(rng, *cond.duration_days)
    duration = f"{count} {unit}{'s' if count != 1 else ''}"
    return rng.choice(
        (
            f"{_capital(p.subject)} reports {duration} of {symptoms}.",
            f"{count}-{unit} history of {symptoms}.",
            f"Describes {symptoms} over the past {duration}.",
            f"{_capital(p.subject)} has had {symptoms} for {duration}.",
        )
    )


def _background(rng: random.Random, cond: Condition, p: _Patient) -> str:
    items = cond.background + (cond.female_background if p.sex == "F" else ())
    if items and rng.random() < 0.6:
        return f" Background: {rng.choice(items)}."
    return ""


def _encounter(rng: random.Random, cond: Condition, med: str) -> _Encounter:
    day = _FIRST_DATE + dt.timedelta(days=rng.randrange(_DATE_SPAN_DAYS))
    style = rng.randrange(3)
    patient = _patient(rng, cond, day, style)
    stay = dt.timedelta(days=rng.randint(1, 8))
    plans = list(cond.plan)
    plan = " ".join(rng.sample(plans, min(len(plans), rng.randint(1, 2)))) if plans else ""
    allergies = [a for a in _ALLERGIES if not (med in _PENICILLINS and "penicillin" in a)]
    return _Encounter(
        cond=cond,
        patient=patient,
        date=_format_date(day, style),
        end_date=_format_date(day + stay, style),
        doctor=_doctor(rng),
        site=rng.choice(_HOSPITALS),
        practice=rng.choice(_PRACTICES),
        complaint=rng.choice(cond.complaints),
        history=_history(rng, cond, patient),
        background=_background(rng, cond, patient),
        vitals=_format_vitals(rng, _vitals(rng, cond)),
        finding=rng.choice(cond.findings) if cond.findings else "examination unremarkable",
        labs=_format_labs(rng, _labs(rng, cond)),
        dose=rng.choice(cond.doses(med)),
        plan=plan,
        follow_up=rng.choice(cond.follow_up),
        allergy=rng.choice(allergies),
    )


def _diagnosis(rng: random.Random, cond: Condition) -> str:
    style = rng.randrange(3)
    if style == 0:
        return f"{cond.name} (ICD-10 {cond.icd10})"
    if style == 1:
        return f"{cond.name} [{cond.icd10}]"
    return f"{cond.icd10} {cond.name}"


def _discharge_summary(rng: random.Random, e: _Encounter) -> str:
    p = e.patient
    heading = rng.choice(("DISCHARGE SUMMARY", "Discharge Summary", "HOSPITAL DISCHARGE SUMMARY"))
    if rng.random() < 0.5:
        ident = f"Patient: {p.name}   DOB: {p.dob} ({p.age} y)   {p.mrn}\nAddress: {p.address}"
    else:
        ident = (
            f"Name: {p.last.upper()}, {p.first} | DOB {p.dob} | Age {p.age} | {p.mrn}\n"
            f"Home address: {p.address}"
        )
    stay = (
        f"Admitted: {e.date}   Discharged: {e.end_date}\n"
        f"Ward: {e.cond.specialty}, {e.site}   Consultant: {e.doctor}"
    )
    verb = rng.choice(("", "Started on ", "New: ", "Commenced "))
    lines = [
        heading,
        ident,
        stay,
        f"{rng.choice(('Presenting complaint', 'Reason for admission'))}: {e.complaint}.",
        f"History: {e.history}{e.background}",
        f"On admission: {e.vitals}. {_capital(e.finding)}.",
        f"{rng.choice(('Investigations', 'Results', 'Bloods'))}: {e.labs}.",
        f"{rng.choice(('Diagnosis', 'Primary diagnosis', 'Discharge diagnosis'))}: "
        f"{_diagnosis(rng, e.cond)}.",
        f"{rng.choice(('Discharge medications', 'Medication changes', 'TTO'))}: "
        f"{verb}{_MED} {e.dose}.",
    ]
    if e.plan:
        lines.append(f"Plan: {e.plan}")
    lines.append(f"Follow-up: {_capital(e.follow_up)}.")
    return "\n".join(lines)


def _progress_note(rng: random.Random, e: _Encounter) -> str:
    p = e.patient
    cond = e.cond
    heading = rng.choice(("PROGRESS NOTE", "Clinic progress note", "Outpatient Progress Note"))
    where = e.practice if cond.specialty == "General Practice" else f"{cond.specialty} clinic"
    context = f"{where} | Date of visit: {e.date} | Seen by {e.doctor}"
    ident = rng.choice(
        (
            f"Patient: {p.name} | DOB {p.dob} | Age {p.age} | {p.mrn}\n{p.address}",
            f"{p.name}, DOB {p.dob} ({p.age} y), {p.mrn}, {p.address}",
        )
    )
    soap = rng.choice((("S", "O", "A", "P"), ("Subjective", "Objective", "Assessment", "Plan")))
    opener = rng.choice(
        (
            f"{p.age}-year-old {p.noun} seen with {e.complaint}.",
            f"{p.age}-year-old {p.noun} reviewed today regarding {e.complaint}.",
            f"Attends with {e.complaint}.",
        )
    )
    verb = rng.choice(("Start ", "Commence ", "Prescribed ", "Started "))
    plan = f"{verb}{_MED} {e.dose}."
    if e.plan:
        plan = f"{e.plan} {plan}" if rng.random() < 0.5 else f"{plan} {e.plan}"
    lines = [
        heading,
        context,
        ident,
        f"{soap[0]}: {opener} {e.history}{e.background} Allergies: {e.allergy}.",
        f"{soap[1]}: {_capital(e.vitals)}. {_capital(e.finding)}. Labs: {e.labs}.",
        f"{soap[2]}: {_diagnosis(rng, cond)}.",
        f"{soap[3]}: {plan} {_capital(e.follow_up)}.",
    ]
    return "\n".join(lines)


def _referral_letter(rng: random.Random, e: _Encounter) -> str:
    p = e.patient
    cond = e.cond
    heading = rng.choice(("REFERRAL LETTER", "Referral", "Letter of referral"))
    # Conditions managed in primary care are referred on to general medicine.
    team = "General Medicine" if cond.specialty == "General Practice" else cond.specialty
    lines = [
        heading,
        f"Date: {e.date}",
        f"To: {team} Outpatients, {e.site}",
        f"From: {e.doctor}, {e.practice}",
        f"Re: {p.name}, DOB {p.dob}, {p.mrn}",
        p.address,
        "",
        rng.choice(("Dear colleague,", "Dear Doctor,", f"Dear {team} team,")),
    ]
    intro = rng.choice(
        (
            f"Thank you for seeing {p.title} {p.last}, a {p.age}-year-old {p.noun} "
            f"with {e.complaint}.",
            f"I would be grateful for your opinion on this {p.age}-year-old {p.noun} who "
            f"presented with {e.complaint}.",
        )
    )
    exam = rng.choice(
        (
            f"On examination {e.vitals}; {e.finding}.",
            f"Observations: {e.vitals}. {_capital(e.finding)}.",
        )
    )
    labs = f"{rng.choice(('Recent bloods', 'Blood tests', 'Results'))}: {e.labs}."
    named = _diagnosis(rng, cond)
    diagnosis = rng.choice((f"My working diagnosis is {named}.", f"I suspect {named}."))
    verb = rng.choice(("I have started ", "In the meantime I have prescribed ", "I have begun "))
    treat = f"{verb}{_MED} {e.dose}."
    tail = f" {e.plan}" if e.plan and rng.random() < 0.5 else ""
    body = f"{intro} {e.history} {exam} {labs} {diagnosis} {treat}{tail}"
    lines += [
        body,
        f"Planned follow-up: {e.follow_up}.",
        rng.choice(("Yours sincerely,", "Kind regards,", "With thanks,")),
        e.doctor,
    ]
    return "\n".join(lines)


_TEMPLATES = {
    "discharge_summary": _discharge_summary,
    "progress_note": _progress_note,
    "referral_letter": _referral_letter,
}


def _note(rng: random.Random) -> dict[str, str]:
    cond = rng.choice(CONDITIONS)
    if cond.inpatient:
        note_type = rng.choices(NOTE_TYPES, weights=(6, 2, 2))[0]
    else:
        note_type = rng.choices(NOTE_TYPES, weights=(0, 3, 2))[0]
    med = rng.choice(cond.medications)
    draft = _TEMPLATES[note_type](rng, _encounter(rng, cond, med))
    cut = draft.index(_MED)
    prompt = draft[:cut]
    return {
        "text": prompt + med + draft[cut + len(_MED) :],
        "note_type": note_type,
        "icd10": cond.icd10,
        "diagnosis": cond.name,
        "medication": med,
        "med_prompt": prompt,
    }


def generate_private_notes(n: int, seed: int) -> list[dict[str, str]]:
    """n pseudo-clinical notes; deterministic for a given (n, seed).

    Each dict has ``text``, ``note_type``, ``icd10``, ``diagnosis``, ``medication`` and
    ``med_prompt`` (the prefix of ``text`` that ends right before the prescribed drug's first
    mention, so ``text.startswith(med_prompt + medication)``).

    Raises:
        ValueError: if ``n`` is negative.
    """
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    rng = random.Random(seed)
    return [_note(rng) for _ in range(n)]


# ---------------------------------------------------------------------------------------------
# Public corpus
# ---------------------------------------------------------------------------------------------


def _lab_direction(cond: Condition) -> tuple[list[str], list[str]]:
    """Labels of this condition's labs that are typically raised / lowered."""
    raised, lowered = [], []
    for key, mean, _ in cond.labs:
        lab = LABS[key]
        if mean > lab.ref_high:
            raised.append(lab.label)
        elif mean < lab.ref_low:
            lowered.append(lab.label)
    return raised, lowered


def _indications(med: str) -> list[Condition]:
    return [c for c in CONDITIONS if med in c.medications]


_DRUG_NOTES: tuple[str, ...] = (
    "Doses may need adjustment in renal or hepatic impairment and in older adults.",
    "Interactions with other regular medicines are checked before it is started.",
    "Explaining the purpose and common side effects at the start improves adherence.",
    "The lowest effective dose is used for the shortest necessary time.",
    "Local formularies may list preferred brands or alternatives.",
    "Pregnancy and breastfeeding require specific advice before prescribing.",
)
_LAB_NOTES: tuple[str, ...] = (
    "Samples are usually taken by venepuncture and processed in the hospital laboratory.",
    "Results are always interpreted alongside the clinical picture.",
    "A single abnormal value is usually repeated before acting on it.",
    "Reference ranges vary slightly between laboratories, age groups and sexes.",
    "Serial measurements are useful for monitoring the response to treatment.",
    "Results are usually available within a few hours of the sample reaching the laboratory.",
)


def _condition_passage(rng: random.Random) -> str:
    cond = rng.choice(CONDITIONS)
    opener = rng.choice(
        (
            f"{_capital(cond.name)} (ICD-10 {cond.icd10}) is {cond.definition}.",
            f"In ICD-10, {cond.name} is coded {cond.icd10}. It is {cond.definition}.",
            f"{_capital(cond.name)}, classified under ICD-10 code {cond.icd10}, is "
            f"{cond.definition}.",
        )
    )
    symptoms = _join(rng.sample(cond.symptoms, min(3, len(cond.symptoms))))
    features = rng.choice(
        (
            f"Typical features include {symptoms}.",
            f"People affected commonly describe {symptoms}.",
            f"Common presenting features are {symptoms}.",
        )
    )
    raised, lowered = _lab_direction(cond)
    lab_bits = []
    if raised:
        lab_bits.append(f"raised {_join(raised)}")
    if lowered:
        lab_bits.append(f"low {_join(lowered)}")
    labs = f" Characteristic results are {_join(lab_bits)}." if lab_bits else ""
    meds = list(cond.medications)
    rng.shuffle(meds)
    first = meds[0]
    treat = rng.choice(
        (
            f"First-line drug treatment is {first}, typically {rng.choice(cond.doses(first))}.",
            f"The usual first-line medicine is {first} ({rng.choice(cond.doses(first))}).",
        )
    )
    if len(meds) > 1:
        alt = meds[1]
        treat += f" {_capital(alt)} ({rng.choice(cond.doses(alt))}) is an accepted alternative."
    monitor = rng.choice(
        (
            f" Follow-up commonly includes {cond.follow_up[0]}.",
            f" Typical follow-up: {_join(list(cond.follow_up))}.",
            "",
        )
    )
    return f"{opener} {features} {cond.diagnosis_basis}{labs} {treat}{monitor}"


def _drug_passage(rng: random.Random) -> str:
    med = rng.choice(ALL_MEDICATION_NAMES)
    info = DRUGS[med]
    uses = _join([c.name for c in _indications(med)])
    opener = rng.choice(
        (
            f"{_capital(med)} is a {info.drug_class}.",
            f"{_capital(med)} is classed as a {info.drug_class}.",
            f"Drug profile: {med}, a {info.drug_class}.",
        )
    )
    use = rng.choice(
        (
            f"It is a first-line treatment for {uses}.",
            f"Its main indication in this formulary is {uses}.",
        )
    )
    doses = MEDICATIONS[med]
    dose = rng.choice(
        (
            f"The usual adult dose is {doses[0]}.",
            f"Typical adult dosing: {_join(list(doses))}.",
        )
    )
    effects = rng.choice(
        (
            f"Common adverse effects include {_join(list(info.adverse_effects))}.",
            f"Reported side effects are {_join(list(info.adverse_effects))}.",
        )
    )
    extra = " ".join(rng.sample(_DRUG_NOTES, 2))
    return f"{opener} {use} {dose} {effects} {info.caution} {extra}"


def _lab_passage(rng: random.Random) -> str:
    key = rng.choice(sorted(LABS))
    lab = LABS[key]
    up = [c.name for c in CONDITIONS if any(k == key and m > lab.ref_high for k, m, _ in c.labs)]
    down = [c.name for c in CONDITIONS if any(k == key and m < lab.ref_low for k, m, _ in c.labs)]
    low = f"{lab.ref_low:.{lab.decimals}f}"
    high = f"{lab.ref_high:.{lab.decimals}f}"
    text = rng.choice(
        (
            f"The {lab.label} {lab.description}.",
            f"Laboratory test: {lab.label}. It {lab.description}.",
        )
    )
    text += rng.choice(
        (
            f" The adult reference range is about {low} to {high}{lab.unit}.",
            f" Values between {low} and {high}{lab.unit} are usually considered normal.",
        )
    )
    if up:
        text += f" High values are typical of {_join(up)}."
    if down:
        text += f" Low values are seen in {_join(down)}."
    if not up and not down:
        text += " It is often requested as part of a routine screen."
    return text + " " + " ".join(rng.sample(_LAB_NOTES, 2))


_ABBREVIATIONS = (
    ("PO", "by mouth"), ("IV", "intravenously"), ("IM", "by intramuscular injection"),
    ("BID", "twice daily"), ("TID", "three times daily"), ("QID", "four times daily"),
    ("PRN", "as needed"), ("OD", "once daily"), ("ICD-10", "the WHO disease classification"),
    ("SpO2", "oxygen saturation by pulse oximetry"), ("RR", "respiratory rate"),
    ("HR", "heart rate"), ("BP", "blood pressure"), ("CRP", "C-reactive protein"),
    ("WBC", "white blood cell count"), ("TSH", "thyroid-stimulating hormone"),
)  # fmt: skip


def _vital_passage(rng: random.Random) -> str:
    if rng.random() < 0.3:
        chosen = rng.sample(_ABBREVIATIONS, 6)
        pairs = _join([f"{abbr} means {meaning}" for abbr, meaning in chosen])
        return (
            "Prescriptions and clinical records use standard abbreviations. "
            f"For example, {pairs}. Doses are written as the amount, the route and the "
            "frequency, so that a reader can reconstruct the instruction without ambiguity. "
            "Unclear abbreviations are a recognised source of medication errors."
        )
    key = rng.choice(sorted(VITALS))
    vital = VITALS[key]
    up = [
        c.name
        for c in CONDITIONS
        if any(k == key and m > vital.mean + 2 * vital.sd for k, m, _ in c.vitals)
    ]
    down = [
        c.name
        for c in CONDITIONS
        if any(k == key and m < vital.mean - 2 * vital.sd for k, m, _ in c.vitals)
    ]
    text = rng.choice(
        (
            f"{_capital(vital.label)} {vital.description}.",
            f"As a vital sign, {vital.label} {vital.description}.",
        )
    )
    text += f" In healthy adults at rest it is usually {vital.normal}."
    if up:
        text += f" It tends to be raised in {_join(up[:4])}."
    if down:
        text += f" It tends to be reduced in {_join(down[:4])}."
    return text + " " + " ".join(rng.sample(_VITAL_NOTES, 2))


_VITAL_NOTES: tuple[str, ...] = (
    "Trends over time are more informative than a single reading.",
    "Early warning scores combine it with the other vital signs to detect deterioration.",
    "Readings are taken after a few minutes of rest, ideally with the person seated.",
    "An unexpected automated reading is usually confirmed manually.",
    "Pain, anxiety, fever and recent exercise can all alter the reading.",
    "Normal values differ in children, in pregnancy and in older adults.",
)


_PASSAGES = (_condition_passage, _drug_passage, _lab_passage, _vital_passage)


def generate_public_corpus(n: int, seed: int) -> list[str]:
    """n passages of general medical reference text (no patients), deterministic.

    Encyclopaedia-style descriptions of conditions, drug monographs and explanations of lab
    tests and vital signs; they teach the vocabulary (diagnoses, ICD-10 codes, doses) without
    any identifier, so pretraining on them cannot leak private notes.

    Raises:
        ValueError: if ``n`` is negative.
    """
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    rng = random.Random(seed)
    return [rng.choices(_PASSAGES, weights=(45, 30, 15, 10))[0](rng) for _ in range(n)]
