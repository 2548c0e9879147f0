"""Inversion files from someone else: the model name they record is never loaded by itself."""
import dataclasses

import pytest

import minledits
from minledits import InversionError, InversionFileError
from minledits.cli import commands
from minledits.io import load, tiny


@pytest.mark.parametrize("recorded", ["/etc/secret-model", "someone/any-hub-repo", "a\nb"])
def test_the_model_an_inversion_file_names_is_a_suggestion_not_a_load(inv1, recorded):
    inv = dataclasses.replace(inv1, model_id=recorded)
    with pytest.raises(InversionFileError, match="was made with model .*minledits loads only a model you name: "
                                                 "add --model ") as e:
        commands.model_to_load(inv, None, "x.safetensors")
    assert "\n" not in str(e.value)
    assert commands.model_to_load(inv, "mine", "x.safetensors") == "mine"


def test_the_suggestion_is_a_shell_word():
    inv = dataclasses.replace(minledits.Inversion([], None, None, None, None), model_id="my model")
    with pytest.raises(InversionFileError, match="add --model 'my model' if you trust it"):
        commands.model_to_load(inv)


@pytest.mark.parametrize("recorded", [load.DEFAULT_MODEL, tiny.NAME])
def test_minledits_own_models_need_no_option(inv1, recorded):
    assert commands.model_to_load(dataclasses.replace(inv1, model_id=recorded)) == recorded


def test_a_recorded_name_is_quoted_short_when_it_is_checked(sd1, inv1):
    inv = dataclasses.replace(inv1, model_id="x\n" * 500, fingerprint="f" * 500)
    with pytest.raises(InversionError, match="was made with model .*…") as e:
        inv.check_model(sd1)
    assert "\n" not in str(e.value) and len(str(e.value)) < 600
