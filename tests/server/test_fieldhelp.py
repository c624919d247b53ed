from difftune.config.schema import CaptionShuffle, DatasetConfig, TrainConfig, VideoConfig
from difftune.server.fieldhelp import CAPTION_SHUFFLE_HELP, DATASET_HELP, TRAIN_HELP, VIDEO_HELP


def test_every_setting_has_one_line_of_help_and_no_stale_ones():
    for model, help_table, where in (
        (TrainConfig, TRAIN_HELP, "TRAIN_HELP"),
        (DatasetConfig, DATASET_HELP, "DATASET_HELP"),
        (VideoConfig, VIDEO_HELP, "VIDEO_HELP"),
        (CaptionShuffle, CAPTION_SHUFFLE_HELP, "CAPTION_SHUFFLE_HELP"),
    ):
        missing = set(model.model_fields) - set(help_table)
        assert not missing, f"add a line of help for {sorted(missing)} to {where} in server/fieldhelp.py"
        assert set(help_table) <= set(model.model_fields), f"{where} describes keys the schema no longer has"
        assert all(text.strip() and "\n" not in text for text in help_table.values())
