import pytest

from data_selection import split_sentences


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: whole pipelines and several processes; `scripts/test.sh --fast` "
                                       "leaves them out")


@pytest.fixture(scope="session")
def demo_sentences(tmp_path_factory):
    """Stage 1 on the small offline demo corpus, shared by the tests that need it."""
    output = tmp_path_factory.mktemp("demo") / "sentences"
    split_sentences.main(["--corpus", "demo-small", "--output_dir", str(output)])
    return output
