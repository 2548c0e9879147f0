"""`minledits evaluate PIE_DIR -o RESULTS`: the PIE-Bench table (placeholder: issue 27)."""


def add_arguments(s):
    s.add_argument("pie_dir", metavar="PIE_DIR", help="the benchmark's data folder (mapping_file.json, "
                   "annotation_images/)")
    s.add_argument("-o", "--output", required=True, metavar="RESULTS", help="folder of the results")


def cmd_evaluate(args):
    raise NotImplementedError("minledits evaluate is not written yet")
