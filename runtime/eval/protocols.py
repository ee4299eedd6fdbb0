"""What the seeds' evaluation protocols fix, in one place (imported by the CLI, so nothing heavy here).

VERIFY_QUESTION     FaceRecBench (arXiv 2510.14866) shows the model two face images and asks whether
                    they belong to the same person, to be answered yes or no; its exact template is
                    printed only as a figure, so this is that question in words (--question replaces it).
VERIFY_MAX_TOKENS   room for a short answer ("Yes.", "No, they are different people."); generation
                    stops at the end of the answer.
MCQ_MAX_TOKENS      FaceLLM's FaceXBench evaluation generates with max_new_tokens=2048 (stopping at the
                    end of the answer), so an answer that reasons before its letter is read whole.
ATTRIBUTES_QUESTION the attributes come from the attribute head; one token is generated.
"""

VERIFY_QUESTION = "Do these two face images belong to the same person? Answer with yes or no."
VERIFY_MAX_TOKENS = 64
MCQ_MAX_TOKENS = 2048
ATTRIBUTES_QUESTION = "Describe this person's face."
